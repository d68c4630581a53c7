//! "No shell-outs": the agent's own code starts no process. Its source is parsed (syn) and
//! every path is checked for a way to spawn one (`std::process::Command`, tokio's, `fork`,
//! `exec*`, `posix_spawn`, `system`, the raw `SYS_clone`/`SYS_execve` numbers), leaving out
//! `#[cfg(test)]` and `#[test]` items (and [`ALLOWED`] files, none today).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Files of oomguard/src that may start processes, and why. None: what runs other programs
/// (the demo, sandboxes, the soak, the benchmark) lives in the dev-only crate oomguard-dev.
const ALLOWED: &[(&str, &str)] = &[];

/// Functions that start a process (libc, nix, rustix) and raw syscall numbers that do.
const SPAWN_FNS: &[&str] = &[
    "fork",
    "vfork",
    "kernel_fork",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "execveat",
    "fexecve",
    "execl",
    "execlp",
    "execle",
    "posix_spawn",
    "posix_spawnp",
    "system",
    "popen",
    "SYS_fork",
    "SYS_vfork",
    "SYS_clone",
    "SYS_clone3",
    "SYS_execve",
    "SYS_execveat",
];

/// Why `segments` (one path) may start a process, if it may.
fn spawns(segments: &[String]) -> Option<String> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let joined = s.join("::");
    if s.windows(2).any(|w| w == ["process", "Command"]) {
        return Some(joined);
    }
    // `clap::Command::new` builds a command line, named as such; any other `Command::new`
    // (imported under any name) may be a process.
    if s.ends_with(&["Command", "new"]) && s.first() != Some(&"clap") {
        return Some(joined);
    }
    if s.len() >= 2 && s.last().is_some_and(|l| SPAWN_FNS.contains(l)) {
        return Some(joined);
    }
    None
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        if a.path().is_ident("test") {
            return true;
        }
        if !a.path().is_ident("cfg") {
            return false;
        }
        a.parse_args::<syn::Ident>().is_ok_and(|i| i == "test")
    })
}

#[derive(Default)]
struct Finder {
    found: Vec<String>,
}

impl Finder {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.leaf(prefix, n.ident.to_string()),
            syn::UseTree::Rename(r) => self.leaf(prefix, r.ident.to_string()),
            syn::UseTree::Glob(_) => self.leaf(prefix, "*".into()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn leaf(&mut self, prefix: &[String], name: String) {
        let mut path = prefix.to_vec();
        path.push(name);
        if let Some(why) = spawns(&path) {
            self.found.push(format!("use {why}"));
        } else if path.ends_with(&["process".to_string(), "*".to_string()]) {
            self.found.push(format!("use {}", path.join("::")));
        }
    }
}

impl<'ast> Visit<'ast> for Finder {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            _ => &[],
        };
        if !is_test_only(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(why) = spawns(&segments) {
            self.found.push(why);
        }
        syn::visit::visit_path(self, p);
    }

    /// Macro arguments are not parsed as Rust: look at their tokens, spaces removed.
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let text: String = m
            .tokens
            .to_string()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let qualified_fn = SPAWN_FNS.iter().any(|f| {
            text.match_indices(&format!("::{f}")).any(|(at, m)| {
                !text[at + m.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
            })
        });
        if text.contains("process::Command") || text.contains("Command::new") || qualified_fn {
            self.found.push(format!("in a macro: {text}"));
        }
        syn::visit::visit_macro(self, m);
    }
}

/// What `source` does that may start a process.
fn spawns_in(source: &str) -> Vec<String> {
    let file = syn::parse_file(source).expect("valid Rust");
    let mut finder = Finder::default();
    finder.visit_file(&file);
    finder.found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_agent_starts_no_process() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {files:?}");
    let mut offences = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let found = spawns_in(&std::fs::read_to_string(file).unwrap());
        match ALLOWED.iter().find(|(f, _)| *f == rel) {
            // The allow-list stays exact: an entry that no longer spawns must go.
            Some((_, why)) => assert!(
                !found.is_empty(),
                "{rel} is allowed to start processes ({why}) but no longer does: \
                 remove it from ALLOWED"
            ),
            None => offences.extend(found.into_iter().map(|f| format!("{rel}: {f}"))),
        }
    }
    assert!(
        offences.is_empty(),
        "the agent must not start processes (no shell-outs):\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_scanner_finds_every_way_to_start_a_process() {
    for bad in [
        "fn f() { std::process::Command::new(\"sh\").status(); }",
        "use std::process::Command; fn f() { Command::new(\"sh\"); }",
        "use std::process::{ExitCode, Command as Cmd};",
        "use std::process::*;",
        "fn f() { let _ = tokio::process::Command::new(\"sh\"); }",
        "fn f() { unsafe { libc::fork() }; }",
        "use nix::unistd::execve;",
        "fn f() { unsafe { libc::syscall(libc::SYS_clone3, 0) }; }",
        "fn f() { unsafe { libc::system(c\"ls\".as_ptr()) }; }",
        "fn f() { tracing::info!(out = ?std::process::Command::new(\"id\").output()); }",
        "mod m { #[cfg(feature = \"x\")] fn f() { libc::posix_spawn(); } }",
    ] {
        assert!(!spawns_in(bad).is_empty(), "missed: {bad}");
    }
    for fine in [
        "use crate::config::Command; fn f(c: Command) { match c { Command::Run(_) => {} } }",
        "fn f() { let _ = clap::Command::new(\"run\"); }",
        "use std::process::ExitCode; fn f() -> ExitCode { ExitCode::SUCCESS }",
        "fn f() { std::process::exit(0) }",
        "fn f() { let a = std::sync::Arc::new(1); let _ = a.clone(); }",
        "#[cfg(test)] mod tests { use std::process::Command; fn t() { Command::new(\"sleep\"); } }",
        "#[test] fn t() { std::process::Command::new(\"sleep\"); }",
        "fn f() { tracing::info!(\"forked\"); let forks = 1; let _ = forks; }",
    ] {
        assert_eq!(spawns_in(fine), Vec::<String>::new(), "{fine}");
    }
}
