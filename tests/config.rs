//! Integration tests of the settings layers through the binary: config file (XDG path or `--config`), then
//! `FASTSYNC_*` variables, then flags; `fastsync config` shows each value and its source; bad keys and values are
//! usage errors that name the key and the file or variable.

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::path::Path;

both_engines!(config_file_env_and_flags_reach_the_engine);

fn config(xdg: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = fastsync().env("XDG_CONFIG_HOME", xdg.to_str().unwrap()).arg("config").args(args);
    for (k, v) in env {
        c = c.env(k, v);
    }
    c.run()
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(&format!("{key} ")) || l.starts_with(&format!("# {key} "))).unwrap_or("")
}

#[test]
fn defaults_then_file_then_env_then_flags() {
    let t = tmp();
    let xdg = t.path().join("xdg");
    let out = config(&xdg, &[], &[]);
    out.assert_success();
    let s = out.stdout_str();
    assert!(s.contains("# no config file"), "{s}");
    assert!(line(&s, "engine").contains("\"auto\"") && line(&s, "engine").ends_with("# default"), "{s}");

    let file = xdg.join("fastsync/config.toml");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(&file, "engine = \"fallback\"\ncores = 3\nmemory_profile = \"low-memory\"\nfsync = true\n").unwrap();
    let s = config(&xdg, &[], &[]).stdout_str();
    assert!(s.contains(&format!("# config file: {}", file.display())), "{s}");
    assert!(
        line(&s, "engine").contains("fallback") && line(&s, "engine").contains(&format!("file {}", file.display()))
    );
    assert!(line(&s, "cores").contains('3'), "{s}");
    assert!(line(&s, "fsync").contains("true"), "{s}");
    assert!(line(&s, "memory_limit").contains("256MiB"), "the low-memory profile's limit: {s}");

    let s = config(&xdg, &[], &[("FASTSYNC_CORES", "2"), ("FASTSYNC_ENGINE", "uring")]).stdout_str();
    assert!(line(&s, "cores").contains('2') && line(&s, "cores").contains("env FASTSYNC_CORES"), "{s}");
    assert!(line(&s, "engine").contains("uring"), "{s}");

    let s = config(&xdg, &["--cores", "1", "--memory-limit", "512M"], &[("FASTSYNC_CORES", "2")]).stdout_str();
    assert!(line(&s, "cores").contains('1') && line(&s, "cores").contains("flag --cores"), "{s}");
    assert!(line(&s, "memory_limit").contains("512MiB") && line(&s, "memory_limit").contains("flag --memory-limit"));

    let out = config(&xdg, &[], &[]);
    let json: serde_json::Value = serde_json::from_str(
        &fastsync().env("XDG_CONFIG_HOME", xdg.to_str().unwrap()).args(["--json", "config"]).run().stdout_str(),
    )
    .unwrap();
    assert_eq!(json["settings"]["cores"]["value"], 3, "{}", out.stdout_str());
}

#[test]
fn explicit_config_file_and_errors_name_key_and_file() {
    let t = tmp();
    let file = t.path().join("my.toml");
    fs::write(&file, "cors = 4\n").unwrap();
    let out = fastsync().arg("--config").arg(&file).arg("config").run();
    out.assert_code(2);
    let err = out.stderr_str();
    assert!(err.contains("unknown key 'cors'") && err.contains(&file.display().to_string()), "{err}");
    assert_eq!(out.stderr_lines().len(), 1, "one line: {err}");

    fs::write(&file, "cores = 0\n").unwrap();
    let out = fastsync().arg("--config").arg(&file).arg("config").run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("key 'cores'"), "{}", out.stderr_str());

    fs::write(&file, "engine = [\n").unwrap();
    let out = fastsync().arg("--config").arg(&file).arg("config").run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("line 1"), "{}", out.stderr_str());

    let missing = t.path().join("nope.toml");
    let out = fastsync().arg("--config").arg(&missing).arg("config").run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("nope.toml"), "{}", out.stderr_str());

    let out = fastsync().env("FASTSYNC_CORES", "abc").arg("config").run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("FASTSYNC_CORES"), "{}", out.stderr_str());
}

/// The settings really drive the run: the engine named in the file is the one the summary reports, the
/// environment overrides it, and a flag overrides both.
fn config_file_env_and_flags_reach_the_engine(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let file = t.path().join("c.toml");
    fs::write(&file, format!("engine = \"{}\"\ncores = 1\n", e.name())).unwrap();
    let run = |extra: &[&str], env: Option<(&str, &str)>, dst: &str| {
        let mut c = fastsync().arg("--config").arg(&file).args(["--json", "copy"]).args(extra);
        if let Some((k, v)) = env {
            c = c.env(k, v);
        }
        let out = c.arg(&src).arg(t.path().join(dst)).run();
        out.assert_success();
        let v: serde_json::Value = serde_json::from_str(out.stdout_str().lines().last().unwrap()).unwrap();
        (v["engine"].as_str().unwrap().to_string(), v["cores"].as_u64().unwrap())
    };
    assert_eq!(run(&[], None, "d1"), (e.name().to_string(), 1));
    assert_eq!(run(&[], Some(("FASTSYNC_ENGINE", e.other().name())), "d2").0, e.other().name());
    assert_eq!(run(&["--engine", e.name()], Some(("FASTSYNC_ENGINE", e.other().name())), "d3").0, e.name());
}
