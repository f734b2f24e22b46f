pub mod alerts;
pub mod bridge;
pub mod console;
// PATCH(gateway)
pub mod downlink;
// PATCH(gateway)
pub(crate) mod gate;
// PATCH(gateway)
pub mod presence;
// PATCH(gateway)
pub mod ingest;
pub mod local;
pub mod meters;
pub mod network;
pub mod remote;
pub mod timer;
