//! `man 1 tether`, written from the same flag definitions as `--help`: argh's help text for
//! [`crate::Args`] is parsed here into roff, so a flag added, renamed or redescribed in
//! `settings.rs` reaches the man page with no second copy to keep in step. The sections argh
//! does not know of (subcommands, signals, files, the admin API) are written here.

use argh::FromArgs;

/// The man page, roff source, for this build's flags.
pub fn page(version: &str) -> String {
    let help = match crate::Args::from_args(&["tether"], &["--help"]) {
        Ok(_) => String::new(), // `--help` always ends early; nothing to document otherwise
        Err(early) => early.output,
    };
    render(&help, version)
}

/// One option of the help text: its flag, the value it takes (if any), its description.
#[derive(Debug, PartialEq)]
pub struct Flag {
    pub name: String,
    pub value: Option<String>,
    pub text: String,
}

/// The flags of argh's help text, in order, with the value names from its usage line.
pub fn flags(help: &str) -> Vec<Flag> {
    let usage = help.lines().next().unwrap_or("");
    let value_of = |name: &str| -> Option<String> {
        let start = usage.find(&format!("[{name} <"))? + name.len() + 3;
        let end = start + usage[start..].find('>')?;
        Some(usage[start..end].to_string())
    };
    let mut out: Vec<Flag> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.trim_end() == "Options:" {
            in_options = true;
            continue;
        }
        if !in_options || line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("  --") {
            // A flag name has no space; a long one leaves a single space before its text.
            let end = rest.find(' ').unwrap_or(rest.len());
            let (name, text) = (&rest[..end], rest[end..].trim());
            let name = format!("--{}", name.trim_end_matches(','));
            if name == "--help" {
                continue;
            }
            let value = value_of(&name);
            out.push(Flag { name, value, text: text.to_string() });
        } else if let Some(last) = out.last_mut() {
            if !last.text.is_empty() {
                last.text.push(' ');
            }
            last.text.push_str(line.trim());
        }
    }
    out
}

/// Escapes text for roff: backslashes, and a leading dot or quote that would read as a request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// `text` with `code spans` set in bold.
fn inline(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('`').enumerate() {
        if i % 2 == 1 {
            out += &format!("\\fB{}\\fR", roff(part));
        } else {
            out += &roff(part);
        }
    }
    out
}

/// The roff page from argh's help text.
pub fn render(help: &str, version: &str) -> String {
    let description = help
        .split("\n\n")
        .nth(1)
        .map(|d| d.trim().trim_start_matches("tether: ").to_string())
        .unwrap_or_default();
    let mut p = String::new();
    p += &format!(".TH TETHER 1 \"\" \"tether {}\" \"User Commands\"\n", roff(version));
    p += ".SH NAME\ntether \\- L4 TCP/UDP load balancer with sticky, consistent\\-hash session persistence\n";
    p += ".SH SYNOPSIS\n";
    p += ".B tether\n[\\fIOPTIONS\\fR] \\-\\-listen \\fIADDR\\fR \\-\\-backend \\fIADDR\\fR...\n.br\n";
    p += ".B tether\n\\-\\-config \\fIFILE\\fR\n.br\n";
    p += ".B tether check\n[\\fIOPTIONS\\fR | \\-\\-config \\fIFILE\\fR [\\-\\-admin \\fIADDR\\fR]]\n.br\n";
    p += ".B tether ctl\n[\\-\\-admin \\fIADDR\\fR] [\\-\\-token\\-file \\fIFILE\\fR] [\\-\\-json] \\fICOMMAND\\fR\n";
    p += ".SH DESCRIPTION\n";
    p += &format!("{}\n", inline(&description));
    p += ".PP\nEach client is pinned, by its source address, to one backend through a consistent\\-hash table and a sticky table; TCP sessions and UDP flows of one client go to the same backend. Bytes are moved both ways without looking at the protocol.\n";
    p += ".SH OPTIONS\n";
    for f in flags(help) {
        p += ".TP\n";
        match &f.value {
            Some(v) => p += &format!("\\fB{}\\fR \\fI{}\\fR\n", roff(&f.name), roff(v)),
            None => p += &format!("\\fB{}\\fR\n", roff(&f.name)),
        }
        p += &format!("{}\n", inline(&f.text));
    }
    p += ".TP\n\\fB\\-\\-help\\fR\nprint the options and exit\n";
    p += COMMANDS;
    p
}

/// The sections argh knows nothing of.
const COMMANDS: &str = r#".SH COMMANDS
.TP
\fBcheck\fR
Validate the flags or the file given with \-\-config and exit: 0 and a one\-line summary when
good, 2 and the error when not. With \-\-config FILE \-\-admin ADDR, also print what
reloading FILE would do to the instance at ADDR (pinned clients moving, sessions cut, share
of the table changing), asked of its admin API without applying anything.
.TP
\fBctl\fR \fICOMMAND\fR
Steer a running tether through its admin API: \fBstatus\fR, \fBbackends\fR,
\fBdrain\fR \fISVC/NAME\fR, \fBmaint\fR \fISVC/NAME\fR, \fBready\fR \fISVC/NAME\fR,
\fBweight\fR \fISVC/NAME N\fR, \fBsticky\fR \fICLIENT\fR, \fBreload\fR, \fBevents\fR.
Tables by default, \-\-json for scripts; the exit status is non\-zero, with the API's error,
on failure.
.TP
\fBman\fR
Print this page (roff).
.SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the file given with \-\-config, all or nothing: a bad file changes nothing.
.TP
\fBSIGUSR2\fR
Upgrade in place: start the binary now at this one's path, hand it the listeners, pins,
health and UDP flows, and serve the open sessions for the upgrade grace period.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, serve open sessions for the grace period, exit; a second one ends them at once.
.SH SYSTEMD
Under systemd (Type=notify) tether says READY=1 once it serves, RELOADING=1 and READY=1 around
a reload, STOPPING=1 at a shutdown, and WATCHDOG=1 while every worker's event loop turns.
A process started by an upgrade says MAINPID= first (the unit sets NotifyAccess=all).
.SH FILES
.TP
\fI/etc/tether/tether.toml\fR
The configuration file of the packaged service.
.TP
\fI/var/lib/tether/\fR
The state file of the packaged service (pins kept across restarts).
.SH EXIT STATUS
0 after a clean stop or a good check; 1 when tether fails while running; 2 for bad flags or
configuration.
.SH SEE ALSO
The documentation in \fI/usr/share/doc/tether/\fR: configuration.md, operations.md,
security.md.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_of_the_help_is_on_the_page_with_its_value_and_whole_description() {
        let help = match crate::Args::from_args(&["tether"], &["--help"]) {
            Ok(_) => unreachable!("--help ends early"),
            Err(early) => early.output,
        };
        let parsed = flags(&help);
        let listed: Vec<&str> = help
            .lines()
            .filter_map(|l| l.strip_prefix("  --"))
            .map(|r| r.split([' ', ',']).next().unwrap_or(""))
            .filter(|n| *n != "help")
            .collect();
        assert_eq!(parsed.iter().map(|f| &f.name[2..]).collect::<Vec<_>>(), listed);
        assert!(parsed.len() > 40, "{}", parsed.len());
        let listen = parsed.iter().find(|f| f.name == "--listen").expect("--listen");
        assert_eq!(listen.value.as_deref(), Some("listen..."));
        assert!(listen.text.contains("(repeatable)"), "continuation lines joined: {}", listen.text);
        let flag = parsed.iter().find(|f| f.name == "--accept-proxy").expect("--accept-proxy");
        assert_eq!(flag.value, None, "a switch takes no value");
        let page = page("1.2.3");
        for f in &parsed {
            assert!(page.contains(&format!("\\fB{}\\fR", roff(&f.name))), "{} on the page", f.name);
        }
        assert!(page.starts_with(".TH TETHER 1 \"\" \"tether 1.2.3\""));
    }

    #[test]
    fn roff_requests_and_escapes_cannot_be_smuggled_in_by_a_description() {
        let help = "Usage: tether [--x <y>]\n\ntether: d\n\nOptions:\n  --x     .so /etc/passwd\n                    a \\fB `code`\n";
        let page = render(help, "v");
        assert!(page.contains("\\&.so /etc/passwd a \\efB \\fBcode\\fR"), "{page}");
        assert!(!page.lines().any(|l| l.starts_with(".so")));
    }
}
