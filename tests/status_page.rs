//! The status page in a real headless browser (Debian's chromium; scripts/test.sh installs it),
//! driven through the DevTools protocol (`testkit::Browser`): the page must draw every
//! backend's sparklines from `/api/history`, the share bars and the drain estimate, and its
//! buttons must change the backend through the API (asking for the token when one is set).

mod common;

use std::path::PathBuf;

use common::*;

fn browser_at(url: &str) -> Browser {
    let chromium = chromium()
        .expect("no chromium found: scripts/test.sh installs it (apt-get install chromium)");
    Browser::open(&chromium, url, (1600, 640)).expect("start chromium")
}

/// Waits until `expression` is true in the page, or fails with what `show` says then.
fn page_shows(b: &mut Browser, expression: &str, show: &str) {
    let v = b.wait_for(expression, DEADLINE).expect("evaluate");
    if v != serde_json::json!(true) {
        let seen = b.eval(show).unwrap_or_default();
        panic!("the page never showed `{expression}`; it shows {seen}");
    }
}

#[test]
fn the_page_draws_history_and_shares_and_its_button_drains_a_backend() {
    let pool = backends(75, 3);
    let t = tether_with_admin(75, &pool, &[]);
    let admin = t.admin();
    // Clients held open on every backend, so that sessions, pins and shares are not zero.
    let held: Vec<_> = (0..30).map(|i| hold(client_ip(i), t.addr()).unwrap()).collect();
    // Three history samples (one every 5 s) give each sparkline a line.
    assert!(wait_until(DEADLINE, || {
        let h = get_json(admin, "/api/history");
        h["times_unix_ms"].as_array().is_some_and(|t| t.len() >= 3)
    }));
    let history = get_json(admin, "/api/history");
    let b0 = history["backends"].as_array().unwrap().iter().find(|b| b["name"] == "b0").unwrap();
    let last = b0["sessions"].as_array().unwrap().last().unwrap().as_u64().unwrap();
    assert_eq!(last, api_backend(admin, "b0")["sessions"].as_u64().unwrap());

    let mut b = browser_at(&format!("http://{admin}/"));
    // One row per backend with its three sparklines, each a line of several points.
    page_shows(
        &mut b,
        "document.querySelectorAll('tr[data-backend] svg.spark polyline').length >= 9",
        "document.getElementById('backends').innerText",
    );
    let points = b
        .eval("document.querySelector('tr[data-backend=\"default/b0\"] svg.spark.live polyline').getAttribute('points').split(' ').length")
        .unwrap();
    assert!(points.as_u64().unwrap() >= 2, "{points}");
    // The share bars add up to the whole service.
    let shares = b
        .eval("[...document.querySelectorAll('[data-share]')].map(e => parseFloat(e.style.width)).reduce((a, x) => a + x, 0)")
        .unwrap();
    assert!((shares.as_f64().unwrap() - 100.0).abs() < 0.5, "pinned shares add to {shares}");

    // A button previews its change and asks first: declined, nothing changes.
    b.eval("window.asked = []; window.confirm = m => { window.asked.push(m); return false; }; document.querySelector('button[data-action=\"maint\"][data-backend=\"default/b1\"]').click()")
        .unwrap();
    page_shows(&mut b, "window.asked.length === 1", "window.asked");
    let asked = b.eval("window.asked[0]").unwrap();
    let b1_pins = api_backend(admin, "b1")["sticky_clients"].as_u64().unwrap();
    let asked = asked.as_str().unwrap().to_string();
    assert!(asked.starts_with("default/b1: state maint\n"), "{asked}");
    assert!(
        asked.contains(&format!("{b1_pins} pinned clients would move, 0 sessions would be cut")),
        "{asked}"
    );
    assert_eq!(api_backend(admin, "b1")["state"], "ready", "a declined change was applied");

    // Drain b1 with its button (confirmed): the API has it, and the page shows it with a drain
    // card.
    b.eval("window.confirm = m => { window.asked.push(m); return true; }; document.querySelector('button[data-action=\"drain\"][data-backend=\"default/b1\"]').click()")
        .unwrap();
    assert!(wait_until(DEADLINE, || api_backend(admin, "b1")["state"] == "drain"));
    let asked = b.eval("window.asked[1]").unwrap();
    assert!(
        asked.as_str().unwrap().contains("state drain\n0 pinned clients would move"),
        "{asked}"
    );
    page_shows(
        &mut b,
        "document.querySelector('tr[data-backend=\"default/b1\"] .pill.drain') !== null \
         && document.querySelector('[data-drain=\"default/b1\"]') !== null",
        "document.body.innerText",
    );
    let card = b.eval("document.querySelector('[data-drain=\"default/b1\"]').innerText").unwrap();
    let pinned = api_backend(admin, "b1")["sticky_clients"].as_u64().unwrap();
    let card = card.as_str().unwrap().to_string();
    assert!(card.contains(&format!("{pinned} pinned clients left")), "{card}");
    // Held sessions do not end: the trend is flat (with no client at all it would be empty).
    let expected = if pinned == 0 { "empty: safe to take out" } else { "not emptying yet" };
    assert!(card.contains(expected), "{card}");
    // The estimate's trend: a least-squares slope per minute over the last samples.
    let slope = b.eval("slopePerMinute([0, 60000, 120000, 180000], [10, 8, null, 4], 12)").unwrap();
    assert!((slope.as_f64().unwrap() + 2.0).abs() < 1e-9, "{slope}");
    page_shows(
        &mut b,
        "document.getElementById('events').innerText.includes('b1: state ready -> drain')",
        "document.getElementById('events').innerText",
    );

    // The weight field.
    b.eval("(() => { const i = document.querySelector('input.weight[data-backend=\"default/b2\"]'); i.value = 7; document.querySelector('button[data-action=\"weight\"][data-backend=\"default/b2\"]').click(); })()")
        .unwrap();
    assert!(wait_until(DEADLINE, || api_backend(admin, "b2")["weight"] == 7));

    // A screenshot (docs/status-page.png is made this way: TETHER_SCREENSHOT=docs/status-page.png).
    let shot = std::env::var("TETHER_SCREENSHOT").map(PathBuf::from).unwrap_or_else(|_| {
        std::env::temp_dir().join(format!("tether-status-{}.png", std::process::id()))
    });
    b.screenshot(&shot).unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 20_000, "a suspiciously small screenshot: {} bytes", png.len());
    if std::env::var("TETHER_SCREENSHOT").is_err() {
        let _ = std::fs::remove_file(&shot);
    }
    drop(held);
}

#[test]
fn a_button_asks_for_the_token_when_the_instance_has_one() {
    let pool = backends(161, 2);
    let file = std::env::temp_dir().join(format!("tether-page-token-{}", std::process::id()));
    std::fs::write(&file, "page-token-of-some-length-1234\n").unwrap();
    let t = tether_with_admin(161, &pool, &["--admin-token-file", file.to_str().unwrap()]);
    let admin = t.admin();
    let mut b = browser_at(&format!("http://{admin}/"));
    page_shows(
        &mut b,
        "document.querySelector('button[data-action=\"maint\"][data-backend=\"default/b0\"]') !== null",
        "document.body.innerText",
    );
    // A wrong token first: the API refuses, the page says so, nothing changes.
    b.eval("window.confirm = () => true; window.prompt = () => 'wrong-token'; document.querySelector('button[data-action=\"maint\"][data-backend=\"default/b0\"]').click()").unwrap();
    page_shows(
        &mut b,
        "document.getElementById('error').innerText.includes('default/b0')",
        "document.getElementById('error').innerText",
    );
    assert_eq!(api_backend(admin, "b0")["state"], "ready");
    // The right one.
    b.eval("sessionStorage.clear(); window.prompt = () => 'page-token-of-some-length-1234'; document.querySelector('button[data-action=\"maint\"][data-backend=\"default/b0\"]').click()").unwrap();
    assert!(wait_until(DEADLINE, || api_backend(admin, "b0")["state"] == "maint"));
    // Kept for the next change: no second prompt.
    b.eval("window.prompt = () => { throw new Error('asked again'); }; document.querySelector('button[data-action=\"ready\"][data-backend=\"default/b0\"]').click()").unwrap();
    assert!(wait_until(DEADLINE, || api_backend(admin, "b0")["state"] == "ready"));
    let _ = std::fs::remove_file(&file);
}
