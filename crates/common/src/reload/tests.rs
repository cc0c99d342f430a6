use std::io::Write;
use std::path::Path;

use super::*;

const EVERY: Duration = Duration::from_secs(2);

/// A file holding one number; the build parses it.
fn number_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn parse_number(path: &Path) -> Build<u32, String> {
    let path = path.to_path_buf();
    Box::new(move |_| {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        text.trim()
            .parse::<u32>()
            .map_err(|e| format!("{text:?}: {e}"))
    })
}

fn reloading(f: &tempfile::NamedTempFile) -> Arc<Reloading<u32, String>> {
    Arc::new(
        Reloading::new(
            "number file",
            vec![f.path().into()],
            EVERY,
            parse_number(f.path()),
        )
        .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_changed_file_is_picked_up_after_one_interval() {
    let f = number_file("1");
    let r = reloading(&f);
    let mut rx = r.subscribe();
    let _task = r.spawn(CancellationToken::new());
    tokio::time::sleep(Duration::from_millis(10)).await;
    std::fs::write(f.path(), "2").unwrap();
    tokio::time::sleep(EVERY / 2).await;
    assert_eq!(r.current(), (0, 1), "not looked at before the interval");
    tokio::time::sleep(EVERY / 2).await;
    assert_eq!(r.current(), (1, 2), "picked up at the interval");
    assert!(rx.has_changed().unwrap(), "published to subscribers");
    assert_eq!(rx.borrow_and_update().value, 2);
}

#[tokio::test(start_paused = true)]
async fn a_broken_file_keeps_the_last_good_value() {
    let f = number_file("7");
    let r = reloading(&f);
    let stop = CancellationToken::new();
    let task = r.spawn(stop.clone());
    std::fs::write(f.path(), "seven").unwrap();
    tokio::time::sleep(EVERY + Duration::from_millis(10)).await;
    assert_eq!(r.current(), (0, 7), "the broken file is not used");
    // Fixed again: picked up at the next interval.
    std::fs::write(f.path(), "8").unwrap();
    tokio::time::sleep(EVERY).await;
    assert_eq!(r.current(), (1, 8));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn get_looks_at_most_once_per_interval() {
    let f = number_file("1");
    let r = reloading(&f);
    std::fs::write(f.path(), "2").unwrap();
    assert_eq!(
        r.get(),
        (0, 1),
        "the last look is younger than the interval"
    );
    tokio::time::advance(EVERY).await;
    assert_eq!(r.get(), (1, 2));
    std::fs::write(f.path(), "3").unwrap();
    assert_eq!(r.get(), (1, 2), "looked just now");
}

#[test]
fn check_reports_what_happened() {
    let f = number_file("1");
    let r = reloading(&f);
    assert_eq!(r.check(), Checked::Unchanged);
    // Same size, same modification time within the clock's resolution: the content hash tells.
    std::fs::write(f.path(), "5").unwrap();
    assert_eq!(r.check(), Checked::Reloaded(1));
    std::fs::write(f.path(), "x").unwrap();
    assert!(matches!(r.check(), Checked::Kept(m) if m.contains("\"x\"")));
    assert_eq!(r.current(), (1, 5));
    assert_eq!(
        r.check(),
        Checked::Unchanged,
        "a broken file is not retried until it changes"
    );
}

#[test]
fn the_first_build_fails_loudly() {
    let f = number_file("nope");
    let e = Reloading::new(
        "number file",
        vec![f.path().into()],
        EVERY,
        parse_number(f.path()),
    );
    assert!(e.is_err());
}

#[test]
fn the_build_gets_the_last_good_value() {
    let f = number_file("1");
    let path = f.path().to_path_buf();
    // Adds the file's number to the previous total.
    let build: Build<u32, String> = Box::new(move |last| {
        let n: u32 = std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Ok(last.copied().unwrap_or(0) + n)
    });
    let r = Reloading::new("sum", vec![f.path().into()], EVERY, build).unwrap();
    assert_eq!(r.rebuild(), Ok(1));
    assert_eq!(r.current(), (1, 2));
}
