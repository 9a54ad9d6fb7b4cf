//! Scripted scenario files, shared by the deterministic tests of the shard
//! server (the watch ring) and the gateway (the watermark merge).
//!
//! A scenario is a text file of commands, one per line. Under a command
//! that produced output, a line `----`, the output, and a blank line:
//!
//! ```text
//! # comments and blank lines are kept as they are
//! put a 1
//! ----
//! event put a rev=1
//!
//! ```
//!
//! [`rewrite`] runs the commands and returns the file with every output
//! block replaced by what the commands produce now; a test passes when the
//! file comes back unchanged. [`check_dir`] does that for every `*.txt` of
//! a directory, and with `UPDATE_SCENARIOS=1` writes the new outputs back
//! instead of failing (review the diff, then commit it).
//!
//! The runner is I/O-free apart from reading and writing the files: a
//! command's meaning belongs entirely to the test's `step`.

use std::path::Path;

/// `text` with every command's output block replaced by `step(command)`
/// (no block when it returns an empty string). Comments (`#`) and blank
/// lines pass through.
pub fn rewrite(text: &str, mut step: impl FnMut(&str) -> String) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        // Drop the old output and the blank line closing it.
        if lines.peek() == Some(&"----") {
            lines.next();
            for l in lines.by_ref() {
                if l.is_empty() {
                    break;
                }
            }
        }
        let produced = step(line);
        if !produced.is_empty() {
            out.push_str("----\n");
            out.push_str(&produced);
            out.push_str("\n\n");
        }
    }
    out
}

/// Runs every `*.txt` scenario in `dir`: `run` returns the rewritten file
/// for each variant it runs the script in (e.g. one per engine), labelled.
/// Panics listing every file and variant whose output changed, unless
/// `UPDATE_SCENARIOS` is set: then the first variant's output is written
/// back (the others must still agree with the file).
pub fn check_dir(dir: &Path, run: impl Fn(&str) -> Vec<(String, String)>) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    let update = std::env::var_os("UPDATE_SCENARIOS").is_some();
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("scenario file");
        for (i, (label, got)) in run(&text).into_iter().enumerate() {
            if got == text {
                continue;
            }
            if update && i == 0 {
                std::fs::write(&file, &got).expect("writing scenario file");
            } else {
                failures.push(format!(
                    "{}{label}:\n--- expected\n{text}\n--- got\n{got}",
                    file.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_replaced_and_comments_kept() {
        let text = "# c\n\necho a\n----\nstale\nmore\n\nquiet\necho b\n";
        let got = rewrite(text, |cmd| match cmd.strip_prefix("echo ") {
            Some(x) => x.to_uppercase(),
            None => String::new(),
        });
        assert_eq!(got, "# c\n\necho a\n----\nA\n\nquiet\necho b\n----\nB\n\n");
        // Rewriting its own output changes nothing.
        let again = rewrite(&got, |cmd| match cmd.strip_prefix("echo ") {
            Some(x) => x.to_uppercase(),
            None => String::new(),
        });
        assert_eq!(again, got);
    }
}
