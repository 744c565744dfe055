//! The status page in a real headless browser (Debian's chromium; scripts/test.sh installs it).
//! The page must render the backends with their state, health and counts after its script ran.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn chromium() -> PathBuf {
    let candidates = [std::env::var("TETHER_CHROMIUM").unwrap_or_default(), "chromium".into()];
    for c in candidates.iter().filter(|c| !c.is_empty()) {
        if let Ok(out) = std::process::Command::new(c).arg("--version").output() {
            if out.status.success() {
                return PathBuf::from(c);
            }
        }
    }
    panic!("no chromium found: scripts/test.sh installs it (apt-get install chromium)");
}

/// Run headless chromium on `url` with `args`; returns its stdout.
fn browse(profile: &Path, url: &str, args: &[&str]) -> String {
    let mut all = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--hide-scrollbars".into(),
        format!("--user-data-dir={}", profile.display()),
        // Let the page's script fetch the API and render before the DOM is taken.
        "--virtual-time-budget=5000".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    all.push(url.to_string());
    let exit = run_to_exit(&chromium(), &all, DEADLINE * 2).expect("run chromium");
    assert!(exit.status.success(), "chromium failed: {}", exit.stderr);
    exit.stdout
}

#[test]
fn status_page_renders_backends_in_a_headless_browser() {
    let pool = backends(75, 3);
    let t = tether_with_admin(75, &pool, &[]);
    let admin = t.admin();
    let r = http(admin, "PUT", "/api/services/default/backends/b1", r#"{"state":"drain"}"#);
    assert_eq!(r.unwrap().status, 200);
    let _held: Vec<_> = (0..4).map(|i| hold(client_ip(i), t.addr()).unwrap()).collect();
    let page = http(admin, "GET", "/", "").unwrap();
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));

    let profile = std::env::temp_dir().join(format!("tether-chromium-{}", std::process::id()));
    let url = format!("http://{admin}/");
    let dom = browse(&profile, &url, &["--dump-dom"]);
    // Rendered by the script from /api/backends: one row per backend, with its state pill.
    for b in &pool {
        assert!(dom.contains(&format!("<td>{}</td>", b.name())), "no row for {}:\n{dom}", b.name());
        assert!(dom.contains(&format!("<td>{}</td>", b.addr())), "no address of {}", b.name());
    }
    assert!(dom.contains(r#"<span class="pill drain">drain</span>"#), "{dom}");
    assert!(dom.contains(r#"<span class="pill up">up</span>"#), "{dom}");
    assert!(dom.contains("b1: state ready -&gt; drain"), "the event list is missing:\n{dom}");
    assert!(dom.contains("updated "), "the script did not finish a refresh:\n{dom}");

    // A screenshot: a PNG of some substance (docs/status-page.png was made the same way; set
    // TETHER_SCREENSHOT to keep this one).
    let shot = std::env::var("TETHER_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| profile.with_extension("png"));
    browse(
        &profile,
        &url,
        &[&format!("--screenshot={}", shot.display()), "--window-size=1500,640"],
    );
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "a suspiciously small screenshot: {} bytes", png.len());
    if std::env::var("TETHER_SCREENSHOT").is_err() {
        let _ = std::fs::remove_file(&shot);
    }
    let _ = std::fs::remove_dir_all(&profile);
}
