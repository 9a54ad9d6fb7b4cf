//! `flamegraph`: CPU flamegraphs from `perf script` text, with no tool
//! beyond `perf` itself.
//!
//! # Input: `perf script`
//!
//! `perf record -g` or `perf record --call-graph dwarf` followed by
//! `perf script` prints one block per sample: a header line, then one
//! indented line (a tab) per stack frame, leaf first, then a blank line:
//!
//! ```text
//! metastore-serve  4711/4713  12133.381478:    1001001 cpu-clock:ppp:
//!     ffffffff81b75dd2 errseq_sample+0x2 ([kernel.kallsyms])
//!               fd001 __GI___open64_nocancel+0x41 (inlined)
//!               33474 _nl_load_locale+0x44 (/usr/lib/x86_64-linux-gnu/libc.so.6)
//!               2ff44 main+0x94 (/usr/bin/bash)
//! ```
//!
//! The header is `COMM PID[/TID] [CPU] TIME: [PERIOD] EVENT:`. The command
//! (thread) name may itself contain spaces, so the header is read around
//! its one unambiguous token, the timestamp (`digits.digits:`): what
//! precedes it is the command, the pid and perhaps `[cpu]`; what follows
//! is the period (when perf prints one) and the event. A frame line is
//! `ADDRESS SYMBOL[+0xOFFSET] (DSO)`; the symbol may contain spaces and
//! parentheses (C++ `f(int) const`, Rust `<T as Trait>::f`), so the DSO is
//! the *last* parenthesised group and the offset the last `+0x` suffix.
//! Frames perf resolved through inline debug information carry the DSO
//! `(inlined)`: they are real frames of the source-level stack and are
//! kept, in perf's order, like any other. Frames perf could not name are
//! `[unknown]`; they become `[dso-file-name]` when the DSO is known (which
//! library the time went to is still worth seeing) and stay `[unknown]`
//! otherwise — notably the `ffffffffffffffff [unknown] ([unknown])` that
//! ends a DWARF stack perf could not unwind to its root, which therefore
//! gathers every truncated stack under one `[unknown]` tower.
//!
//! # Folding
//!
//! A stack is turned into one string, frames root→leaf joined by `;`,
//! optionally under the thread name as the bottom frame (so a shard's
//! executor thread, RocksDB's background threads and the tokio workers of
//! the gateway are told apart). Identical strings are summed: the result
//! is the "collapsed" (folded) format that every flamegraph tool reads,
//! one `frame;frame;frame WEIGHT` line per distinct stack. The weight is
//! the sample's period when perf printed one (nanoseconds for
//! `cpu-clock`, events for hardware counters; samples at a fixed
//! frequency then still count for the time they stand for), else 1 per
//! sample. Invariants the rest relies on:
//!
//! - a frame name never contains `;` (replaced by `,`: Rust's `[u8; 32]`)
//!   and never ends a line, since the weight is the text after the last
//!   space;
//! - the sum of all lines' weights is the total of every parsed sample, so
//!   a frame's width — the sum over the stacks that pass through it — is
//!   its inclusive share of the CPU, and the weight of the stacks it ends
//!   is its self share;
//! - folding is deterministic: lines are written sorted, so two runs over
//!   the same input give byte-identical files.
//!
//! Pruning (`--folded-min-percent`, for files meant to be kept: DWARF
//! stacks of async Rust are 50–120 frames of long generic names, a few MB
//! for a few thousand samples) cuts the call tree the way the SVG does: a
//! frame under the threshold goes with all its callees, and what was cut
//! under one caller is kept as a single `[pruned]` child of it. So the
//! total is unchanged and every frame that is kept has its exact
//! inclusive and self weight; only the detail under small frames is lost.
//!
//! Kernel frames get the customary `_[k]` suffix (kernel address or
//! `[kernel.*]` DSO), which other tools also colour apart.
//!
//! Names are tidied moderately, never to the point of losing the path of
//! the function: the legacy Rust hash suffix (`::h0123456789abcdef`) goes,
//! runs of `::{{closure}}` shrink to one, generic arguments nested two or
//! more levels deep become `<..>` (`drop_in_place<tokio::..::Stage<..>>`),
//! and a trailing C++ parameter list is dropped (`rocksdb::DBImpl::
//! WriteImpl(...)` → `rocksdb::DBImpl::WriteImpl`). `--raw-names` keeps
//! perf's names untouched.
//!
//! # Rendering
//!
//! The folded stacks become a tree rooted at `all`; children are ordered
//! by name (as in the classic flamegraph: the x axis is not time, and
//! sorting is what lets identical call paths merge). Each node is one
//! rectangle whose width is its inclusive weight over the total, stacked
//! bottom-up by depth; a node under `--min-percent` of the total is left
//! out together with its subtree (its descendants are narrower still),
//! and `[pruned]` frames are left out too: both show as the usual gap
//! above their caller.
//! Each rectangle carries a `<title>` tooltip with the full name, its
//! samples and its share, and a label cut to what fits the width in a
//! monospace font. Colours come from a hash of the name, so a function
//! keeps its colour across graphs: warm reds/oranges/yellows for user
//! code, a darker orange band for the kernel, a pale brown for frames perf
//! could not name. The SVG is static: no script, views in any browser or
//! image viewer, and diffs in review.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct FlameArgs {
    /// `perf script` output to read (or, with --folded, collapsed stacks).
    #[arg(long)]
    pub input: PathBuf,
    /// SVG to write; the folded stacks go to `<out>.folded`.
    #[arg(long)]
    pub out: PathBuf,
    /// Title printed at the top of the graph [default: the input's name].
    #[arg(long)]
    pub title: Option<String>,
    /// Leave out frames under this percentage of the total.
    #[arg(long, default_value_t = 0.1)]
    pub min_percent: f64,
    /// Prune the .folded file's call tree at frames under this percentage
    /// of the total, into `[pruned]` (0 = every stack as sampled; the SVG
    /// and the top table always use every stack).
    #[arg(long, default_value_t = 0.0)]
    pub folded_min_percent: f64,
    /// The input is already folded (`frame;frame count` lines).
    #[arg(long)]
    pub folded: bool,
    /// Count samples even when perf printed a period for each.
    #[arg(long)]
    pub count_samples: bool,
    /// Don't put the thread name under each stack.
    #[arg(long)]
    pub no_thread: bool,
    /// Keep perf's symbol names as they are (no tidying of generics etc.).
    #[arg(long)]
    pub raw_names: bool,
    /// Print this many top self-time frames as a Markdown table (0 = none).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Width of the SVG in pixels.
    #[arg(long, default_value_t = 1200)]
    pub width: u32,
}

/// Runs the `flamegraph` subcommand.
pub fn main(a: &FlameArgs) -> ExitCode {
    match run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metastore-bench flamegraph: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &FlameArgs) -> Result<(), String> {
    let file =
        std::fs::File::open(&a.input).map_err(|e| format!("open {}: {e}", a.input.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let opts = FoldOptions {
        thread_root: !a.no_thread,
        raw_names: a.raw_names,
        by_period: !a.count_samples,
    };
    let folded = if a.folded {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text)
            .map_err(|e| format!("read {}: {e}", a.input.display()))?;
        Folded::parse(&text)?
    } else {
        let mut folded = Folded::default();
        let mut parser = PerfScriptParser::default();
        let mut buf = Vec::new();
        // Frames: (all, inlined, [unknown]).
        let mut frames = (0u64, 0u64, 0u64);
        let mut count = |s: &Sample| {
            for f in &s.frames {
                frames.0 += 1;
                frames.1 += f.is_inlined() as u64;
                frames.2 += (f.symbol == "[unknown]") as u64;
            }
        };
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| format!("read {}: {e}", a.input.display()))?;
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf);
            if let Some(s) = parser.line(&line) {
                count(&s);
                folded.add(&s, &opts);
            }
        }
        if let Some(s) = parser.finish() {
            count(&s);
            folded.add(&s, &opts);
        }
        eprintln!(
            "metastore-bench flamegraph: {} frames read, {} of them inlined, {} unnamed",
            frames.0, frames.1, frames.2
        );
        folded
    };
    if folded.weight == 0 {
        return Err(format!(
            "no samples with a stack in {} (was it recorded with -g or --call-graph?)",
            a.input.display()
        ));
    }
    let folded_path = folded_path(&a.out);
    let (text, kept) = folded.to_text(a.folded_min_percent);
    std::fs::write(&folded_path, &text)
        .map_err(|e| format!("write {}: {e}", folded_path.display()))?;
    let title = a.title.clone().unwrap_or_else(|| {
        a.input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "flamegraph".into())
    });
    let svg = render_svg(
        &folded,
        &RenderOptions {
            title,
            min_percent: a.min_percent,
            width: a.width as f64,
        },
    );
    std::fs::write(&a.out, &svg).map_err(|e| format!("write {}: {e}", a.out.display()))?;
    eprintln!(
        "metastore-bench flamegraph: {} {}, {} distinct stacks → {} ({} KiB), {} ({} KiB, {} stacks; {:.1}% of the weight outside [pruned])",
        folded.samples,
        if folded.from_folded { "total weight" } else { "samples" },
        folded.stacks.len(),
        a.out.display(),
        svg.len() / 1024,
        folded_path.display(),
        text.len() / 1024,
        kept.0,
        100.0 * kept.1 as f64 / folded.weight as f64,
    );
    if a.top > 0 {
        print!("{}", top_table(&folded.top_self(a.top), folded.weight));
    }
    Ok(())
}

/// `<out>.folded` next to the SVG.
pub fn folded_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".folded");
    PathBuf::from(s)
}

// ---------------------------------------------------------------------------
// Parsing `perf script`.

/// One frame as perf printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub addr: u64,
    /// The symbol without its `+0x` offset; `[unknown]` when perf had none.
    pub symbol: String,
    /// The DSO in the trailing parentheses (`[kernel.kallsyms]`, a path,
    /// `inlined`, `[unknown]`), empty when absent.
    pub dso: String,
}

impl Frame {
    pub fn is_inlined(&self) -> bool {
        self.dso == "inlined"
    }

    pub fn is_kernel(&self) -> bool {
        self.dso.starts_with("[kernel") || (self.addr >> 47 != 0 && self.addr != u64::MAX)
    }
}

/// One sample: its thread, its period (if printed) and its frames, leaf
/// first as perf prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub comm: String,
    pub period: Option<u64>,
    pub frames: Vec<Frame>,
}

/// Line-by-line parser of `perf script` output: feed it every line and it
/// hands back each sample once the sample's block is over.
#[derive(Default)]
pub struct PerfScriptParser {
    cur: Option<Sample>,
}

impl PerfScriptParser {
    /// Consumes one line; returns the sample it completed, if any.
    pub fn line(&mut self, line: &str) -> Option<Sample> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            return self.cur.take();
        }
        if line.starts_with('#') {
            return None;
        }
        if line.starts_with([' ', '\t']) {
            if let (Some(cur), Some(f)) = (self.cur.as_mut(), parse_frame(line)) {
                cur.frames.push(f);
            }
            return None;
        }
        // A header: the previous sample ends even without a blank line.
        let done = self.cur.take();
        self.cur = parse_header(line);
        done
    }

    /// The last sample, at the end of the input.
    pub fn finish(&mut self) -> Option<Sample> {
        self.cur.take()
    }
}

/// Parses a whole `perf script` text.
#[cfg(test)]
pub fn parse_perf_script(text: &str) -> Vec<Sample> {
    let mut p = PerfScriptParser::default();
    let mut out: Vec<Sample> = text.lines().filter_map(|l| p.line(l)).collect();
    out.extend(p.finish());
    out
}

fn is_timestamp(tok: &str) -> bool {
    let Some(t) = tok.strip_suffix(':') else {
        return false;
    };
    let mut parts = t.splitn(2, '.');
    let a = parts.next().unwrap_or("");
    let b = parts.next().unwrap_or("");
    !a.is_empty()
        && !b.is_empty()
        && a.bytes().all(|c| c.is_ascii_digit())
        && b.bytes().all(|c| c.is_ascii_digit())
}

/// `COMM PID[/TID] [CPU] TIME: [PERIOD] EVENT: [IP SYM (DSO)]`.
fn parse_header(line: &str) -> Option<Sample> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    let t = toks.iter().position(|t| is_timestamp(t))?;
    // Before the time: COMM (may have spaces), PID[/TID], maybe [CPU].
    let mut end = t;
    if end > 0 && toks[end - 1].starts_with('[') && toks[end - 1].ends_with(']') {
        end -= 1;
    }
    let is_pid = |s: &str| {
        s.split('/')
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    };
    if end > 0 && is_pid(toks[end - 1]) {
        end -= 1;
    }
    let comm = if end > 0 {
        toks[..end].join(" ")
    } else {
        "[unknown]".to_string()
    };
    // After the time: maybe PERIOD, then EVENT:, then maybe an inline frame.
    let mut i = t + 1;
    let mut period = None;
    if let Some(p) = toks.get(i).and_then(|s| s.parse::<u64>().ok()) {
        period = Some(p);
        i += 1;
    }
    let mut frames = Vec::new();
    if toks.get(i).is_some_and(|e| e.ends_with(':')) {
        i += 1;
        if i < toks.len() {
            // Samples without a call graph carry their one frame here.
            frames.extend(parse_frame(&toks[i..].join(" ")));
        }
    }
    Some(Sample {
        comm,
        period,
        frames,
    })
}

/// `ADDRESS SYMBOL[+0xOFF] (DSO)`.
fn parse_frame(line: &str) -> Option<Frame> {
    let line = line.trim();
    let (addr, rest) = line.split_once(char::is_whitespace)?;
    let addr = u64::from_str_radix(addr, 16).ok()?;
    let rest = rest.trim();
    let (sym, dso) = match rest.rfind(" (") {
        Some(i) if rest.ends_with(')') => (&rest[..i], &rest[i + 2..rest.len() - 1]),
        _ if rest.starts_with('(') && rest.ends_with(')') => ("", &rest[1..rest.len() - 1]),
        _ => (rest, ""),
    };
    let sym = sym.trim();
    let sym = match sym.rfind("+0x") {
        Some(i) if sym[i + 3..].bytes().all(|c| c.is_ascii_hexdigit()) && i + 3 < sym.len() => {
            &sym[..i]
        }
        _ => sym,
    };
    let symbol = if sym.is_empty() { "[unknown]" } else { sym };
    Some(Frame {
        addr,
        symbol: symbol.to_string(),
        dso: dso.to_string(),
    })
}

// ---------------------------------------------------------------------------
// Names.

/// How samples are folded.
#[derive(Clone, Debug)]
pub struct FoldOptions {
    /// The thread (command) name as the bottom frame.
    pub thread_root: bool,
    /// Keep perf's names untouched.
    pub raw_names: bool,
    /// Weight by the period when perf printed one.
    pub by_period: bool,
}

impl Default for FoldOptions {
    fn default() -> Self {
        FoldOptions {
            thread_root: true,
            raw_names: false,
            by_period: true,
        }
    }
}

/// The folded-format name of a frame.
pub fn frame_name(f: &Frame, raw: bool) -> String {
    let mut name = if f.symbol == "[unknown]" {
        let base = f.dso.rsplit('/').next().unwrap_or("");
        if base.is_empty() || base == "[unknown]" || base == "inlined" {
            "[unknown]".to_string()
        } else if base.starts_with('[') {
            base.to_string()
        } else {
            format!("[{base}]")
        }
    } else if raw {
        f.symbol.clone()
    } else {
        tidy_symbol(&f.symbol)
    };
    name = name.replace(';', ",");
    if f.is_kernel() && !name.ends_with("_[k]") {
        name.push_str("_[k]");
    }
    name
}

/// Moderate tidying of a demangled Rust or C++ name (see the module docs).
pub fn tidy_symbol(sym: &str) -> String {
    let mut s = sym.trim().to_string();
    // Legacy Rust mangling hash.
    if let Some(i) = s.rfind("::h") {
        let h = &s[i + 3..];
        if h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()) {
            s.truncate(i);
        }
    }
    // `::{{closure}}::{{closure}}` → `::{{closure}}`.
    while s.contains("::{{closure}}::{{closure}}") {
        s = s.replace("::{{closure}}::{{closure}}", "::{{closure}}");
    }
    let s = strip_cpp_params(&s);
    collapse_deep_generics(&s, 2)
}

/// Drops a trailing C++ parameter list: `ns::f(int, char const*) const`
/// → `ns::f`. Leaves `(anonymous namespace)::g` and names without a
/// trailing list alone.
fn strip_cpp_params(s: &str) -> String {
    let body = s.strip_suffix(" const").unwrap_or(s);
    if !body.ends_with(')') {
        return s.to_string();
    }
    let bytes = body.as_bytes();
    let mut depth = 0i32;
    for i in (0..bytes.len()).rev() {
        match bytes[i] {
            b')' => depth += 1,
            b'(' => {
                depth -= 1;
                if depth == 0 {
                    let head = &body[..i];
                    // `X::operator()(int)` → `X::operator()`; `X::operator()`
                    // stays.
                    if head.ends_with("operator") {
                        return body.to_string();
                    }
                    if head.ends_with("operator()") {
                        return head.to_string();
                    }
                    let ok = head
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '>');
                    return if ok { head.to_string() } else { s.to_string() };
                }
            }
            _ => {}
        }
    }
    s.to_string()
}

/// Replaces generic arguments nested `depth` or more levels deep by `..`:
/// `a<b<c>>` at depth 2 → `a<b<..>>`. `->` is not a bracket. Unbalanced
/// names (`operator<`) come back unchanged.
fn collapse_deep_generics(s: &str, depth: usize) -> String {
    let mut out = String::with_capacity(s.len());
    let mut level = 0usize;
    let mut prev = '\0';
    for c in s.chars() {
        match c {
            '<' => {
                level += 1;
                if level <= depth {
                    out.push(c);
                }
                if level == depth {
                    out.push_str("..");
                }
            }
            '>' if prev != '-' => {
                if level == 0 {
                    return s.to_string();
                }
                if level <= depth {
                    out.push(c);
                }
                level -= 1;
            }
            _ => {
                if level < depth {
                    out.push(c);
                }
            }
        }
        prev = c;
    }
    if level != 0 {
        return s.to_string();
    }
    out
}

// ---------------------------------------------------------------------------
// Folding.

/// Weight and sample count of one stack (or frame).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Weight {
    pub weight: u64,
    pub samples: u64,
}

impl Weight {
    fn add(&mut self, o: Weight) {
        self.weight += o.weight;
        self.samples += o.samples;
    }
}

/// Folded stacks: `root;..;leaf` → weight.
#[derive(Clone, Debug, Default)]
pub struct Folded {
    pub stacks: HashMap<String, Weight>,
    /// Samples folded (with at least one frame).
    pub samples: u64,
    /// Their total weight.
    pub weight: u64,
    /// Whether any sample was weighted by its period.
    pub by_period: bool,
    /// Read from a folded file: weights of unknown unit, no sample counts.
    pub from_folded: bool,
}

impl Folded {
    /// Folds one sample in. Samples without frames are skipped.
    pub fn add(&mut self, s: &Sample, opts: &FoldOptions) {
        if s.frames.is_empty() {
            return;
        }
        let mut key = String::new();
        if opts.thread_root {
            key.push_str(&s.comm.replace(';', ","));
        }
        for f in s.frames.iter().rev() {
            if !key.is_empty() {
                key.push(';');
            }
            key.push_str(&frame_name(f, opts.raw_names));
        }
        let w = match (opts.by_period, s.period) {
            (true, Some(p)) if p > 0 => {
                self.by_period = true;
                p
            }
            _ => 1,
        };
        self.add_stack(
            key,
            Weight {
                weight: w,
                samples: 1,
            },
        );
    }

    fn add_stack(&mut self, key: String, w: Weight) {
        self.samples += w.samples;
        self.weight += w.weight;
        self.stacks.entry(key).or_default().add(w);
    }

    /// Reads collapsed stacks (`frame;frame WEIGHT` lines).
    pub fn parse(text: &str) -> Result<Folded, String> {
        let mut f = Folded {
            from_folded: true,
            ..Folded::default()
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (stack, w) = line
                .rsplit_once(' ')
                .ok_or_else(|| format!("line {}: no weight", n + 1))?;
            let w: u64 = w
                .parse()
                .map_err(|_| format!("line {}: bad weight {w:?}", n + 1))?;
            f.add_stack(
                stack.to_string(),
                Weight {
                    weight: w,
                    samples: w,
                },
            );
        }
        Ok(f)
    }

    /// The collapsed text, sorted. With `min_percent` > 0 the call tree is
    /// pruned like the SVG: a frame under `min_percent` of the total is cut
    /// together with its callees, and the weight of the frames cut under
    /// one caller goes to a `[pruned]` child of it, so every kept frame
    /// keeps its inclusive *and* self weight and the total is unchanged.
    /// Also returns (lines written, weight outside `[pruned]`).
    pub fn to_text(&self, min_percent: f64) -> (String, (usize, u64)) {
        let mut lines: Vec<(String, u64)> = if min_percent <= 0.0 {
            self.stacks
                .iter()
                .map(|(k, w)| (k.clone(), w.weight))
                .collect()
        } else {
            let nodes = build_tree(self);
            let min = self.weight as f64 * min_percent / 100.0;
            let mut out = Vec::new();
            let mut path = Vec::new();
            emit_pruned(&nodes, 0, min, &mut path, &mut out);
            out
        };
        lines.sort();
        let mut out = String::new();
        let mut kept = 0;
        for (k, w) in &lines {
            let _ = writeln!(out, "{k} {w}");
            if !k.ends_with(PRUNED) {
                kept += w;
            }
        }
        (out, (lines.len(), kept))
    }

    /// The `n` frames with the most self weight (the stacks they end).
    pub fn top_self(&self, n: usize) -> Vec<(String, Weight)> {
        let mut by: HashMap<&str, Weight> = HashMap::new();
        for (k, w) in &self.stacks {
            let leaf = k.rsplit(';').next().unwrap_or(k);
            by.entry(leaf).or_default().add(*w);
        }
        let mut v: Vec<(String, Weight)> =
            by.into_iter().map(|(k, w)| (k.to_string(), w)).collect();
        v.sort_by(|a, b| b.1.weight.cmp(&a.1.weight).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// The pseudo-frame that stands for the callees cut by pruning.
pub const PRUNED: &str = "[pruned]";

/// The stacks of the subtree under `i` (whose path is `path`), with
/// frames under `min` cut into `[pruned]`.
fn emit_pruned<'a>(
    nodes: &'a [Node],
    i: usize,
    min: f64,
    path: &mut Vec<&'a str>,
    out: &mut Vec<(String, u64)>,
) {
    let n = &nodes[i];
    let mut children = 0;
    let mut pruned = 0;
    for &c in n.children.values() {
        let w = nodes[c].w.weight;
        children += w;
        // An earlier pruning's `[pruned]` is pruned again: re-pruning a
        // pruned file at a higher threshold equals pruning the original.
        if (w as f64) < min || nodes[c].name == PRUNED {
            pruned += w;
        } else {
            path.push(&nodes[c].name);
            emit_pruned(nodes, c, min, path, out);
            path.pop();
        }
    }
    let own = n.w.weight - children;
    if own > 0 && !path.is_empty() {
        out.push((path.join(";"), own));
    }
    if pruned > 0 {
        path.push(PRUNED);
        out.push((path.join(";"), pruned));
        path.pop();
    }
}

/// A Markdown table of top self-time frames.
pub fn top_table(top: &[(String, Weight)], total: u64) -> String {
    let mut s = String::from("| # | self % | samples | frame |\n|---:|---:|---:|---|\n");
    for (i, (name, w)) in top.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {:.2}% | {} | `{}` |",
            i + 1,
            100.0 * w.weight as f64 / total.max(1) as f64,
            w.samples,
            name.replace('|', "\\|").replace('`', "'")
        );
    }
    s
}

// ---------------------------------------------------------------------------
// The tree and the SVG.

struct Node {
    name: String,
    w: Weight,
    children: BTreeMap<String, usize>,
}

/// The call tree of the folded stacks; node 0 is `all`.
fn build_tree(f: &Folded) -> Vec<Node> {
    let mut nodes = vec![Node {
        name: "all".into(),
        w: Weight::default(),
        children: BTreeMap::new(),
    }];
    for (stack, w) in &f.stacks {
        nodes[0].w.add(*w);
        let mut at = 0;
        for frame in stack.split(';') {
            let next = match nodes[at].children.get(frame) {
                Some(&i) => i,
                None => {
                    let i = nodes.len();
                    nodes.push(Node {
                        name: frame.to_string(),
                        w: Weight::default(),
                        children: BTreeMap::new(),
                    });
                    nodes[at].children.insert(frame.to_string(), i);
                    i
                }
            };
            nodes[next].w.add(*w);
            at = next;
        }
    }
    nodes
}

pub struct RenderOptions {
    pub title: String,
    pub min_percent: f64,
    pub width: f64,
}

const FRAME_H: f64 = 16.0;
const FONT: f64 = 11.0;
/// Advance of one character of an 11px monospace font.
const CHAR_W: f64 = FONT * 0.61;
const PAD: f64 = 10.0;
const TOP: f64 = 54.0;

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c if (c as u32) < 0x20 && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// FNV-1a: a stable hash, so a name keeps its colour across graphs.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A warm colour for a frame name.
pub fn color(name: &str) -> String {
    let h = fnv1a(name);
    let (a, b, c) = (
        (h & 0xff) as u32,
        ((h >> 8) & 0xff) as u32,
        ((h >> 16) & 0xff) as u32,
    );
    let (r, g, bl) = if name.ends_with("_[k]") {
        // Kernel: a darker orange band.
        (200 + a % 40, 90 + b % 60, c % 30)
    } else if name.starts_with('[') {
        // [unknown], [libfoo.so]: pale brown.
        (190 + a % 20, 170 + b % 20, 140 + c % 20)
    } else {
        // Classic "hot": red through orange to yellow.
        (205 + a % 50, b % 230, c % 55)
    };
    format!("rgb({r},{g},{bl})")
}

/// The label that fits in `w` pixels: the name, or its start and `..`.
pub fn fit_label(name: &str, w: f64) -> Option<String> {
    let fit = ((w - 6.0) / CHAR_W).floor();
    if fit < 3.0 {
        return None;
    }
    let fit = fit as usize;
    let n = name.chars().count();
    if n <= fit {
        Some(name.to_string())
    } else {
        let mut s: String = name.chars().take(fit - 2).collect();
        s.push_str("..");
        Some(s)
    }
}

/// Renders the folded stacks as a standalone static SVG flamegraph.
pub fn render_svg(f: &Folded, o: &RenderOptions) -> String {
    let nodes = build_tree(f);
    let total = nodes[0].w.weight.max(1);
    let min = total as f64 * o.min_percent / 100.0;
    // Depth of the visible tree.
    fn depth(nodes: &[Node], i: usize, min: f64) -> usize {
        1 + nodes[i]
            .children
            .values()
            .filter(|&&c| nodes[c].w.weight as f64 >= min)
            .map(|&c| depth(nodes, c, min))
            .max()
            .unwrap_or(0)
    }
    let levels = depth(&nodes, 0, min);
    let plot_w = o.width - 2.0 * PAD;
    let height = TOP + levels as f64 * FRAME_H + 30.0;
    let base = TOP + levels as f64 * FRAME_H; // bottom edge of the `all` row
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height:.0}" viewBox="0 0 {w} {height:.0}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{FONT}">"##,
        w = o.width
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="#fdfbf6"/>
<text x="{x}" y="22" font-size="16" font-weight="bold" text-anchor="middle" font-family="Helvetica, Arial, sans-serif">{}</text>"##,
        esc(&o.title),
        x = o.width / 2.0
    );
    let what = if f.from_folded {
        format!("total weight {} (folded input)", f.weight)
    } else if f.by_period {
        format!("{} samples weighted by their period", f.samples)
    } else {
        format!("{} samples", f.samples)
    };
    let _ = writeln!(
        s,
        r##"<text x="{x}" y="40" fill="#555" text-anchor="middle" font-family="Helvetica, Arial, sans-serif" font-size="12">{what}, {} distinct stacks; frames under {}% hidden; hover for details</text>"##,
        f.stacks.len(),
        o.min_percent,
        x = o.width / 2.0
    );
    // Iterative walk: (node, x offset in weight units, depth).
    let mut todo = vec![(0usize, 0u64, 0usize)];
    while let Some((i, x0, d)) = todo.pop() {
        let n = &nodes[i];
        let x = PAD + x0 as f64 / total as f64 * plot_w;
        let w = n.w.weight as f64 / total as f64 * plot_w;
        let y = base - (d as f64 + 1.0) * FRAME_H;
        let pct = 100.0 * n.w.weight as f64 / total as f64;
        let detail = if f.from_folded {
            format!("weight {}, {pct:.2}%", n.w.weight)
        } else if f.by_period {
            format!("{} samples, period {}, {pct:.2}%", n.w.samples, n.w.weight)
        } else {
            format!("{} samples, {pct:.2}%", n.w.weight)
        };
        let fill = if i == 0 {
            "rgb(220,200,190)".to_string()
        } else {
            color(&n.name)
        };
        let _ = write!(
            s,
            r##"<g><title>{} ({detail})</title><rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" rx="2" fill="{fill}"/>"##,
            esc(&n.name),
            FRAME_H - 1.0
        );
        if let Some(label) = fit_label(&n.name, w) {
            let _ = write!(
                s,
                r##"<text x="{:.2}" y="{:.1}">{}</text>"##,
                x + 3.0,
                y + FRAME_H - 4.5,
                esc(&label)
            );
        }
        s.push_str("</g>\n");
        let mut cx = x0;
        for &c in n.children.values() {
            let cw = nodes[c].w.weight;
            if cw as f64 >= min && cw > 0 && nodes[c].name != PRUNED {
                todo.push((c, cx, d + 1));
            }
            cx += cw;
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `-g` (frame pointer) sample and a DWARF one with inlined frames,
    /// as perf 6.1 prints them.
    const BASIC: &str = "\
metastore-serve  4711/4713  12133.381478:    1001001 cpu-clock:ppp: 
\tffffffff81b75dd2 errseq_sample+0x2 ([kernel.kallsyms])
\tffffffff821ef691 do_syscall_64+0x71 ([kernel.kallsyms])
\t           fd001 __GI___open64_nocancel+0x41 (inlined)
\t           33474 _nl_load_locale+0x44 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t           2ff44 main+0x94 (/opt/bin/metastore-server)

metastore-serve  4711/4713  12133.383478:    2002002 cpu-clock:ppp: 
\t           33474 _nl_load_locale+0x44 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t           2ff44 main+0x94 (/opt/bin/metastore-server)
";

    #[test]
    fn parses_headers_frames_and_periods() {
        let s = parse_perf_script(BASIC);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].comm, "metastore-serve");
        assert_eq!(s[0].period, Some(1001001));
        assert_eq!(s[0].frames.len(), 5);
        assert_eq!(s[0].frames[0].symbol, "errseq_sample");
        assert_eq!(s[0].frames[0].dso, "[kernel.kallsyms]");
        assert!(s[0].frames[0].is_kernel());
        assert_eq!(s[0].frames[4].addr, 0x2ff44);
        assert_eq!(s[0].frames[4].dso, "/opt/bin/metastore-server");
        assert!(!s[0].frames[4].is_kernel());
        assert_eq!(s[1].period, Some(2002002));
        assert_eq!(s[1].frames.len(), 2);
    }

    #[test]
    fn keeps_inlined_frames_in_order() {
        let text = "\
tokio-runtime-w 900/905 [001] 55.000001: 1000 cpu-clock:
\t    5555550a1000 hashbrown::raw::RawTable<T,A>::find+0x20 (inlined)
\t    5555550a1000 std::collections::hash::map::HashMap<K,V,S>::get+0x20 (inlined)
\t    5555550a1000 metastore_gateway::router::Router::route+0x140 (/opt/metastore-gateway)
\t    5555550a2000 main+0x10 (/opt/metastore-gateway)
";
        let s = parse_perf_script(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].comm, "tokio-runtime-w");
        assert_eq!(s[0].period, Some(1000));
        let f = &s[0].frames;
        assert_eq!(f.len(), 4);
        assert!(f[0].is_inlined() && f[1].is_inlined() && !f[2].is_inlined());
        assert_eq!(f[0].symbol, "hashbrown::raw::RawTable<T,A>::find");
        let mut folded = Folded::default();
        folded.add(&s[0], &FoldOptions::default());
        let (text, _) = folded.to_text(0.0);
        assert_eq!(
            text,
            "tokio-runtime-w;main;metastore_gateway::router::Router::route;\
             std::collections::hash::map::HashMap<K,V,S>::get;\
             hashbrown::raw::RawTable<T,A>::find 1000\n"
        );
    }

    #[test]
    fn unknown_frames_name_their_dso_when_they_can() {
        let text = "\
rocksdb:low 77 1.500000: 500 cpu-clock:
\t            1487a get_common_indices+0x7a (inlined)
\t           648d3 [unknown] (/usr/lib/x86_64-linux-gnu/libsnappy.so.1.1.9)
\tffffffffffffffff [unknown] ([unknown])
";
        let s = parse_perf_script(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].comm, "rocksdb:low");
        let f = &s[0].frames;
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].symbol, "[unknown]");
        assert_eq!(frame_name(&f[1], false), "[libsnappy.so.1.1.9]");
        assert_eq!(frame_name(&f[2], false), "[unknown]");
        assert!(!f[2].is_kernel(), "the unwinding stop marker is not kernel");
        let mut folded = Folded::default();
        folded.add(&s[0], &FoldOptions::default());
        assert_eq!(
            folded.to_text(0.0).0,
            "rocksdb:low;[unknown];[libsnappy.so.1.1.9];get_common_indices 500\n"
        );
    }

    #[test]
    fn headers_with_spaces_cpu_and_no_period() {
        let s = parse_perf_script(
            "shard 1 exec 10/11 [000] 3.25: cycles:P:\n\t  10 f+0x1 (/x)\n\n\
             bare 12 4.5: task-clock:  4000 leaf_fn+0x8 (/y)\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].comm, "shard 1 exec");
        assert_eq!(s[0].period, None);
        assert_eq!(s[0].frames[0].symbol, "f");
        // No call graph: the sample's own frame is on its header line.
        assert_eq!(s[1].comm, "bare");
        assert_eq!(s[1].frames.len(), 1);
        assert_eq!(s[1].frames[0].symbol, "leaf_fn");
        assert_eq!(s[1].frames[0].dso, "/y");
    }

    #[test]
    fn cpp_and_rust_names_are_tidied_but_keep_their_path() {
        assert_eq!(
            tidy_symbol(
                "rocksdb::DBImpl::WriteImpl(rocksdb::WriteOptions const&, rocksdb::WriteBatch*)"
            ),
            "rocksdb::DBImpl::WriteImpl"
        );
        assert_eq!(
            tidy_symbol("rocksdb::(anonymous namespace)::Foo::bar() const"),
            "rocksdb::(anonymous namespace)::Foo::bar"
        );
        assert_eq!(
            tidy_symbol("metastore_server::shard::run::{{closure}}::{{closure}}::{{closure}}"),
            "metastore_server::shard::run::{{closure}}"
        );
        assert_eq!(
            tidy_symbol(
                "core::ptr::drop_in_place<tokio::runtime::task::core::Stage<hyper::Conn<T>>>"
            ),
            "core::ptr::drop_in_place<tokio::runtime::task::core::Stage<..>>"
        );
        assert_eq!(
            tidy_symbol("<alloc::vec::Vec<T,A> as core::ops::drop::Drop>::drop"),
            "<alloc::vec::Vec<..> as core::ops::drop::Drop>::drop"
        );
        assert_eq!(tidy_symbol("foo::bar::h0123456789abcdef"), "foo::bar");
        assert_eq!(
            tidy_symbol("call<fn() -> u32>"),
            "call<fn() -> u32>",
            "-> is not a bracket"
        );
        assert_eq!(tidy_symbol("std::operator<"), "std::operator<");
        assert_eq!(
            tidy_symbol(
                "rocksdb::MemTable::KeyComparator::operator()(char const*, char const*) const"
            ),
            "rocksdb::MemTable::KeyComparator::operator()"
        );
        assert_eq!(tidy_symbol("Cmp::operator()"), "Cmp::operator()");
        let raw = Frame {
            addr: 1,
            symbol: "f<[u8; 32]>".into(),
            dso: "/x".into(),
        };
        assert_eq!(frame_name(&raw, true), "f<[u8, 32]>", "no ; inside a frame");
    }

    #[test]
    fn folding_sums_identical_stacks_and_keeps_the_total() {
        let mut text = String::new();
        for (i, leaf) in ["a", "b", "a", "a", "c"].iter().enumerate() {
            let _ = write!(
                text,
                "srv 1/2 {i}.0: 10 cpu-clock:\n\t1 {leaf}+0x1 (/bin)\n\t2 mid (/bin)\n\t3 main (/bin)\n\n"
            );
        }
        // A sample without frames (no call graph at all) is not counted.
        text.push_str("srv 1/2 9.0: 10 cpu-clock:\n\n");
        let samples = parse_perf_script(&text);
        assert_eq!(samples.len(), 6);
        let mut f = Folded::default();
        for s in &samples {
            f.add(s, &FoldOptions::default());
        }
        assert_eq!(f.samples, 5);
        assert_eq!(f.weight, 50);
        let (out, (n, kept)) = f.to_text(0.0);
        assert_eq!(
            out,
            "srv;main;mid;a 30\nsrv;main;mid;b 10\nsrv;main;mid;c 10\n"
        );
        assert_eq!((n, kept), (3, 50));
        // Pruning cuts frames under 25% (b and c) into `[pruned]`.
        let (pruned, (n, kept)) = f.to_text(25.0);
        assert_eq!(pruned, "srv;main;mid;[pruned] 20\nsrv;main;mid;a 30\n");
        assert_eq!((n, kept), (2, 30));
        // Self weight of kept frames survives pruning.
        let mut h = f.clone();
        h.add_stack(
            "srv;main".into(),
            Weight {
                weight: 50,
                samples: 5,
            },
        );
        h.add_stack(
            "srv;main;tiny;deep".into(),
            Weight {
                weight: 1,
                samples: 1,
            },
        );
        let (pruned, _) = h.to_text(25.0);
        assert_eq!(
            pruned,
            "srv;main 50\nsrv;main;[pruned] 1\nsrv;main;mid;[pruned] 20\nsrv;main;mid;a 30\n"
        );
        assert_eq!(Folded::parse(&pruned).unwrap().weight, h.weight);
        // Re-pruning a pruned file equals pruning the original.
        let (p10, _) = h.to_text(10.0);
        assert_eq!(Folded::parse(&p10).unwrap().to_text(25.0).0, pruned);
        // Counting samples instead of periods; no thread root.
        let mut g = Folded::default();
        let o = FoldOptions {
            thread_root: false,
            by_period: false,
            ..FoldOptions::default()
        };
        for s in &samples {
            g.add(s, &o);
        }
        assert_eq!(
            g.to_text(0.0).0,
            "main;mid;a 3\nmain;mid;b 1\nmain;mid;c 1\n"
        );
        // The folded text reads back to the same stacks.
        let back = Folded::parse(&out_all(&f)).unwrap();
        assert_eq!(back.stacks, {
            let mut m = f.stacks.clone();
            for w in m.values_mut() {
                w.samples = w.weight;
            }
            m
        });
        let top = f.top_self(2);
        assert_eq!(top[0].0, "a");
        assert_eq!(top[0].1.weight, 30);
        assert_eq!(top[0].1.samples, 3);
        assert_eq!(top.len(), 2);
        assert!(top_table(&top, f.weight).contains("| 1 | 60.00% | 3 | `a` |"));
    }

    fn out_all(f: &Folded) -> String {
        f.to_text(0.0).0
    }

    #[test]
    fn renders_widths_proportional_and_hides_small_frames() {
        let f = Folded::parse("t;main;big 90\nt;main;small 9\nt;main;tiny 1\n").unwrap();
        let svg = render_svg(
            &f,
            &RenderOptions {
                title: "t <&>".into(),
                min_percent: 2.0,
                width: 1020.0,
            },
        );
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        // all, t, main, big, small: tiny (1%) is hidden.
        assert_eq!(svg.matches("<rect x=").count(), 5);
        assert!(!svg.contains(">tiny"));
        assert!(svg.contains("<title>big (weight 90, 90.00%)</title>"));
        // Plot width 1000: big is 900 wide, small 90.
        assert!(svg.contains(r#"width="900.00""#));
        assert!(svg.contains(r#"width="90.00""#));
        // Rows stack bottom-up: `all` is the lowest.
        let y_of = |name: &str| -> f64 {
            let g = svg
                .lines()
                .find(|l| l.contains(&format!("<title>{name} (")))
                .unwrap();
            let y = g.split("y=\"").nth(1).unwrap();
            y[..y.find('"').unwrap()].parse().unwrap()
        };
        assert!(y_of("all") > y_of("t") && y_of("t") > y_of("main") && y_of("main") > y_of("big"));
    }

    #[test]
    fn labels_are_cut_to_fit_and_colours_are_stable_and_warm() {
        assert_eq!(fit_label("abc", 10.0), None);
        assert_eq!(fit_label("main", 200.0).as_deref(), Some("main"));
        let l = fit_label("a_very_long_function_name", 60.0).unwrap();
        assert!(l.ends_with("..") && l.chars().count() * 6 < 60);
        assert_eq!(color("foo"), color("foo"));
        for name in ["foo", "bar", "x::y", "schedule_k_[k]", "[unknown]"] {
            let c = color(name);
            let v: Vec<u32> = c[4..c.len() - 1]
                .split(',')
                .map(|x| x.parse().unwrap())
                .collect();
            assert!(v[0] >= 190 && v[0] > v[2], "{name}: {c} is warm");
        }
    }
}
