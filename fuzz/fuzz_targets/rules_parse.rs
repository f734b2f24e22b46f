//! The rule loader: TOML parsing, schema checks and CEL compilation of every condition,
//! through the public `RuleSet::parse`. Any text gives a rule set or diagnostics, never
//! a panic; every diagnostic points inside the file.
#![no_main]

use gateway::rules::RuleSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match RuleSet::parse("fuzz.toml", text) {
        Ok(set) => drop(set),
        Err(diags) => {
            assert!(!diags.is_empty(), "Err without diagnostics");
            let lines = text.split('\n').count();
            for d in diags.iter() {
                assert!(d.line >= 1 && d.line <= lines, "line {} of {lines}", d.line);
                assert!(d.col >= 1, "column {}", d.col);
                assert!(!d.message.is_empty());
            }
        }
    }
});
