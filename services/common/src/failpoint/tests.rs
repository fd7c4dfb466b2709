use super::*;

#[test]
fn rules_are_read_and_written_back_the_same() {
    let text = "runtime.sandbox.after-network=1*kill; storage.layer.after-unpack=error\n\
                image.pull.after-layer=sleep(250);network.setup.after-add=3*off";
    let (rules, problems) = parse(text);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        rules,
        [
            Rule {
                point: "runtime.sandbox.after-network".into(),
                action: Action::Kill,
                count: Some(1)
            },
            Rule {
                point: "storage.layer.after-unpack".into(),
                action: Action::Error,
                count: None
            },
            Rule {
                point: "image.pull.after-layer".into(),
                action: Action::Sleep(250),
                count: None
            },
            Rule {
                point: "network.setup.after-add".into(),
                action: Action::Off,
                count: Some(3)
            },
        ]
    );
    assert_eq!(parse(&render(&rules)).0, rules);
}

#[test]
fn hostile_text_is_left_out_with_a_short_reason() {
    let long_name = format!("{}=kill", "a".repeat(65));
    for bad in [
        "no-equals-sign",
        "Upper.Case=kill",
        "../etc=kill",
        "x=explode",
        "x=0*kill",
        "x=99999999999*kill",
        "x=sleep(600000)",
        "x=sleep(-1)",
        "x=sleep(12",
        "x=\u{1b}[31mkill",
        long_name.as_str(),
    ] {
        let (rules, problems) = parse(bad);
        assert!(rules.is_empty(), "{bad:?} gave {rules:?}");
        assert_eq!(problems.len(), 1, "{bad:?}");
        assert!(
            !problems[0].contains('\u{1b}') && problems[0].len() < 200,
            "{problems:?}"
        );
    }
    let huge = "x=kill;".repeat(1000);
    let (rules, problems) = parse(&huge);
    assert!(rules.is_empty());
    assert!(problems[0].contains("more than 4096"), "{problems:?}");
    // Good entries beside bad ones still count; comments and blanks are skipped.
    let (rules, problems) = parse("# comment\n;; a.b=error; c.d=nonsense");
    assert_eq!(rules.len(), 1);
    assert_eq!(problems.len(), 1);
}

#[test]
fn counted_rules_go_down_and_away() {
    let (mut rules, _) = parse("a.b=2*error;c.d=kill");
    assert_eq!(take(&mut rules, "x.y"), (None, false));
    assert_eq!(take(&mut rules, "a.b"), (Some(Action::Error), true));
    assert_eq!(render(&rules), "a.b=1*error;c.d=kill");
    assert_eq!(take(&mut rules, "a.b"), (Some(Action::Error), true));
    assert_eq!(render(&rules), "c.d=kill");
    assert_eq!(take(&mut rules, "a.b"), (None, false));
    assert_eq!(take(&mut rules, "c.d"), (Some(Action::Kill), false));
    assert_eq!(render(&rules), "c.d=kill");
}

#[cfg(debug_assertions)]
#[test]
fn the_file_is_read_at_every_hit_and_counted_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("failpoints");
    std::fs::write(&file, "common.test.file=2*error").expect("write");
    // The file is handed over directly: setting the environment needs unsafe code.
    let hit_with_file = || {
        let _turn = active_file_test_turn();
        active_from_file(&file, "common.test.file")
    };
    assert_eq!(hit_with_file(), Some(Action::Error));
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "common.test.file=1*error"
    );
    assert_eq!(hit_with_file(), Some(Action::Error));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "");
    assert_eq!(hit_with_file(), None, "spent");
    std::fs::write(&file, "common.test.file=error").expect("write");
    assert_eq!(
        hit_with_file(),
        Some(Action::Error),
        "changed while running"
    );
}

#[cfg(debug_assertions)]
fn active_file_test_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(debug_assertions)]
fn active_from_file(path: &std::path::Path, point: &str) -> Option<Action> {
    active::from_file(path, point)
}
