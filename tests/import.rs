//! `contacts import` against a real Postgres: bad rows are reported with their line
//! numbers while the good rows load.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::io::Write;

use disparo::cli::import::{InputFormat, import_file};

#[tokio::test]
async fn three_bad_rows_among_ten_thousand() {
    let (pool, _) = common::fresh_db().await;
    let mut file = tempfile::NamedTempFile::with_suffix(".csv").unwrap();
    writeln!(file, "phone,name,tags,city").unwrap();
    // line 1 is the header; data row i sits on line i + 2
    let bad_lines = [2 + 17, 2 + 4242, 2 + 9999];
    for i in 0..10_000usize {
        let line = i + 2;
        if line == bad_lines[0] {
            writeln!(file, "not-a-phone,Bad,vip,SP").unwrap();
        } else if line == bad_lines[1] {
            writeln!(file, "+55 11 123,Short,vip,SP").unwrap();
        } else if line == bad_lines[2] {
            writeln!(file, "{},Extra,vip,SP,oops", common::phone(i)).unwrap();
        } else {
            writeln!(file, "{},Name {i},vip|sp,São Paulo", common::phone(i)).unwrap();
        }
    }
    file.flush().unwrap();
    let report = import_file(&pool, "acme", file.path(), None, None, 1000).await.unwrap();
    assert_eq!(report.read, 10_000);
    assert_eq!(report.inserted, 9_997);
    assert_eq!(report.updated, 0);
    let lines: Vec<u64> = report.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, bad_lines.iter().map(|l| *l as u64).collect::<Vec<_>>(), "{report}");
    assert!(report.rejected[0].reason.contains("not-a-phone"));
    assert!(report.rejected[2].reason.contains("fields"));
    assert_eq!(disparo::store::contacts::count(&pool, "acme").await.unwrap(), 9_997);
    let (tags, city): (Vec<String>, String) =
        sqlx::query_as("SELECT tags, attributes->>'city' FROM contacts WHERE phone = $1")
            .bind(common::phone(0))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tags, vec!["vip", "sp"]);
    assert_eq!(city, "São Paulo");

    // importing again updates instead of inserting, and keeps opt-outs
    disparo::store::contacts::opt_out(&pool, "acme", &common::phone(0)).await.unwrap();
    let again = import_file(&pool, "acme", file.path(), Some(InputFormat::Csv), None, 1000).await.unwrap();
    assert_eq!((again.inserted, again.updated), (0, 9_997));
    let (opted,): (bool,) = sqlx::query_as("SELECT opted_out FROM contacts WHERE phone = $1")
        .bind(common::phone(0))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(opted);
}

#[tokio::test]
async fn json_lines_with_region_and_duplicates() {
    let (pool, _) = common::fresh_db().await;
    let mut file = tempfile::NamedTempFile::with_suffix(".jsonl").unwrap();
    writeln!(file, r#"{{"phone":"(11) 98888-0001","name":"Ana","tags":["vip"],"attributes":{{"plan":"gold"}}}}"#)
        .unwrap();
    writeln!(file, r#"{{"phone":"+5511988880001","name":"Ana B"}}"#).unwrap();
    writeln!(file, r#"{{"name":"no phone"}}"#).unwrap();
    writeln!(file).unwrap();
    writeln!(file, r#"not json"#).unwrap();
    file.flush().unwrap();
    let report = import_file(&pool, "acme", file.path(), None, Some("BR"), 1000).await.unwrap();
    assert_eq!((report.read, report.inserted, report.updated), (4, 1, 1));
    let lines: Vec<u64> = report.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![3, 5]);
    let (name,): (String,) =
        sqlx::query_as("SELECT name FROM contacts WHERE phone = '+5511988880001'").fetch_one(&pool).await.unwrap();
    assert_eq!(name, "Ana B");
}

async fn tags_of(pool: &sqlx::PgPool, phone: &str) -> (Vec<String>, Option<String>, serde_json::Value, Option<String>) {
    sqlx::query_as(
        "SELECT tags, name, attributes, whatsapp_id FROM contacts WHERE organization = 'acme' AND phone = $1",
    )
    .bind(phone)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn file_with(suffix: &str, bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::with_suffix(suffix).unwrap();
    file.write_all(bytes).unwrap();
    file.flush().unwrap();
    file
}

/// Only what a file says changes: a file without a `tags` column (or a JSON line
/// without `tags`) leaves the stored tags alone, and so on for every field.
#[tokio::test]
async fn reimporting_a_file_without_a_tags_column_keeps_the_tags() {
    let (pool, _) = common::fresh_db().await;
    let (a, b) = (common::phone(1), common::phone(2));
    let first = file_with(
        ".csv",
        format!("phone,name,tags,city,whatsapp_id\n{a},Ana,vip|sp,SP,5511900000001\n{b},Bia,new,RJ,\n").as_bytes(),
    );
    import_file(&pool, "acme", first.path(), None, None, 1000).await.unwrap();
    assert_eq!(tags_of(&pool, &a).await.0, vec!["vip", "sp"]);

    // a second file with other columns: names and the new attribute change, nothing else
    let second = file_with(".csv", format!("phone,name,plan\n{a},Ana Maria,gold\n{b},,\n").as_bytes());
    let report = import_file(&pool, "acme", second.path(), None, None, 1000).await.unwrap();
    assert_eq!((report.inserted, report.updated, report.rejected.len()), (0, 2, 0), "{report}");
    let (tags, name, attributes, wa_id) = tags_of(&pool, &a).await;
    assert_eq!(tags, vec!["vip", "sp"], "no tags column: tags kept");
    assert_eq!(name.as_deref(), Some("Ana Maria"));
    assert_eq!(attributes, serde_json::json!({"city": "SP", "plan": "gold"}));
    assert_eq!(wa_id.as_deref(), Some("5511900000001"), "no whatsapp_id column: kept");
    let (tags, name, attributes, _) = tags_of(&pool, &b).await;
    assert_eq!(
        (tags, name.as_deref(), attributes),
        (vec!["new".to_owned()], Some("Bia"), serde_json::json!({"city": "RJ"}))
    );

    // JSON lines: a field that is absent changes nothing; a repeated phone merges its rows
    let lines = file_with(
        ".jsonl",
        format!("{{\"phone\":\"{a}\",\"attributes\":{{\"plan\":\"silver\"}}}}\n{{\"phone\":\"{b}\",\"tags\":[\"x\"]}}\n{{\"phone\":\"{b}\",\"name\":\"Bia B\"}}\n")
            .as_bytes(),
    );
    let report = import_file(&pool, "acme", lines.path(), None, None, 1000).await.unwrap();
    assert!(report.rejected.is_empty(), "{report}");
    let (tags, name, attributes, _) = tags_of(&pool, &a).await;
    assert_eq!((tags, name.as_deref()), (vec!["vip".to_owned(), "sp".to_owned()], Some("Ana Maria")));
    assert_eq!(attributes["plan"], "silver");
    let (tags, name, _, _) = tags_of(&pool, &b).await;
    assert_eq!(
        (tags, name.as_deref()),
        (vec!["x".to_owned()], Some("Bia B")),
        "the later row of a phone adds to the earlier one"
    );

    // a tags column that is present but empty clears the tags: the file says so
    let cleared = file_with(".csv", format!("phone,tags\n{a},\n").as_bytes());
    import_file(&pool, "acme", cleared.path(), None, None, 1000).await.unwrap();
    assert!(tags_of(&pool, &a).await.0.is_empty());
}

/// The same rows written with LF, CRLF, a byte-order mark, and a quoted field that spans
/// lines: each rejected row is reported on the line an editor shows it on.
#[tokio::test]
async fn rejected_rows_are_reported_on_the_lines_an_editor_shows() {
    let (pool, _) = common::fresh_db().await;
    let good = |i: usize| format!("{},Name {i},vip", common::phone(i));
    // (line contents, the lines expected to be rejected)
    let rows = vec![
        "phone,name,tags".to_owned(),                           // 1
        good(1),                                                // 2
        "not-a-phone,Bad,vip".to_owned(),                       // 3
        good(2),                                                // 4
        format!("{},\"Two\nLines\",vip", common::phone(3)),     // 5-6: a quoted name spanning two lines
        "+55 11 123,Short,vip".to_owned(),                      // 7
        format!("{},\"Three\n\nLines\",vip", common::phone(4)), // 8-10
        format!("{},Extra,vip,oops", common::phone(5)),         // 11
        good(6),                                                // 12
        "x,\"Quoted\nbad\",vip".to_owned(),                     // 13-14
        good(7),                                                // 15
    ];
    let expected = vec![3u64, 7, 11, 13];
    for (label, newline, bom) in [
        ("LF", "\n", false),
        ("CRLF", "\r\n", false),
        ("CR", "\r", false),
        ("BOM + LF", "\n", true),
        ("BOM + CRLF", "\r\n", true),
    ] {
        let mut text = rows.join("\n").replace('\n', newline);
        text.push_str(newline);
        let mut bytes = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
        bytes.extend_from_slice(text.as_bytes());
        let file = file_with(".csv", &bytes);
        let report = import_file(&pool, "acme", file.path(), None, None, 1000).await.unwrap();
        let lines: Vec<u64> = report.rejected.iter().map(|r| r.line).collect();
        assert_eq!(lines, expected, "{label}: {report}");
        assert_eq!(report.read, 10, "{label}");
        // the header is read whatever the line endings and the byte-order mark
        let (name,): (String,) = sqlx::query_as("SELECT name FROM contacts WHERE phone = $1")
            .bind(common::phone(3))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(name, "Two\nLines", "{label}");
    }
    // the last line without a newline, and JSON lines with CRLF
    let file = file_with(".csv", format!("phone,name\r\n{},A\r\nbad,B", common::phone(8)).as_bytes());
    let report = import_file(&pool, "acme", file.path(), None, None, 1000).await.unwrap();
    assert_eq!(report.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![3]);
    let file = file_with(
        ".jsonl",
        format!("\u{feff}{{\"phone\":\"{}\"}}\r\n\r\n{{\"phone\":\"bad\"}}\r\n", common::phone(9)).as_bytes(),
    );
    let report = import_file(&pool, "acme", file.path(), None, None, 1000).await.unwrap();
    assert_eq!(report.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![3], "{report}");
    assert_eq!(report.read, 2);
}
