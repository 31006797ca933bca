//! `contacts import` against a real Postgres: bad rows are reported with their line
//! numbers while the good rows load.

mod common;

use std::io::Write;

use disparo::cli::import::{import_file, InputFormat};

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
        sqlx::query_as("SELECT tags, attributes->>'city' FROM contacts WHERE phone = $1").bind(common::phone(0)).fetch_one(&pool).await.unwrap();
    assert_eq!(tags, vec!["vip", "sp"]);
    assert_eq!(city, "São Paulo");

    // importing again updates instead of inserting, and keeps opt-outs
    disparo::store::contacts::opt_out(&pool, "acme", &common::phone(0)).await.unwrap();
    let again = import_file(&pool, "acme", file.path(), Some(InputFormat::Csv), None, 1000).await.unwrap();
    assert_eq!((again.inserted, again.updated), (0, 9_997));
    let (opted,): (bool,) = sqlx::query_as("SELECT opted_out FROM contacts WHERE phone = $1").bind(common::phone(0)).fetch_one(&pool).await.unwrap();
    assert!(opted);
}

#[tokio::test]
async fn json_lines_with_region_and_duplicates() {
    let (pool, _) = common::fresh_db().await;
    let mut file = tempfile::NamedTempFile::with_suffix(".jsonl").unwrap();
    writeln!(file, r#"{{"phone":"(11) 98888-0001","name":"Ana","tags":["vip"],"attributes":{{"plan":"gold"}}}}"#).unwrap();
    writeln!(file, r#"{{"phone":"+5511988880001","name":"Ana B"}}"#).unwrap();
    writeln!(file, r#"{{"name":"no phone"}}"#).unwrap();
    writeln!(file).unwrap();
    writeln!(file, r#"not json"#).unwrap();
    file.flush().unwrap();
    let report = import_file(&pool, "acme", file.path(), None, Some("BR"), 1000).await.unwrap();
    assert_eq!((report.read, report.inserted, report.updated), (4, 1, 1));
    let lines: Vec<u64> = report.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![3, 5]);
    let (name,): (String,) = sqlx::query_as("SELECT name FROM contacts WHERE phone = '+5511988880001'").fetch_one(&pool).await.unwrap();
    assert_eq!(name, "Ana B");
}
