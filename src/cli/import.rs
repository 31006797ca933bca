//! `disparo contacts import`: loads contacts from CSV (with a header) or JSON lines into
//! an organization, streaming the file in batches so a million rows never sit in memory,
//! validating every phone number with libphonenumber's rules, and reporting each
//! rejected row with its line number while the good rows load.
//!
//! Only what the file states changes: a column (or JSON field) the file does not have
//! leaves the stored value alone, so a file of names does not erase anyone's tags.
//! Line numbers are those an editor shows, whatever the line endings (LF, CRLF, CR),
//! with or without a UTF-8 byte-order mark, and with quoted fields spanning lines.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use sqlx::PgPool;

use crate::store::contacts::{self, ContactUpdate};

/// Arguments of `contacts import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Organization (Kubernetes namespace) the contacts belong to.
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// CSV file with a header row (`phone`, optional `name`, `tags`, `whatsapp_id`, other
    /// columns become attributes) or JSON lines
    /// (`{"phone":..,"name":..,"tags":[..],"attributes":{..},"whatsapp_id":..}`). Columns
    /// or fields the file lacks leave the stored values alone.
    pub file: PathBuf,
    /// Input format; guessed from the file extension when omitted.
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// Region used for numbers written without a country code (ISO 3166 code, e.g. BR).
    #[arg(long)]
    pub default_region: Option<String>,
    /// Rows per upsert statement.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// An operator's tool: import with the admin Postgres URL instead of the namespace's
    /// own credential. Without it, the import reads the namespace's `disparo-database`
    /// Secret with your own Kubernetes rights, so you import only where you may read it.
    #[arg(long, hide_env_values = true)]
    pub admin_database_url: Option<String>,
}

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// One rejected row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line number in the file.
    pub line: u64,
    /// Why it was rejected.
    pub reason: String,
}

/// The final report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Data rows read.
    pub read: u64,
    /// New contacts.
    pub inserted: u64,
    /// Existing contacts updated (including rows repeating a phone seen earlier in the file).
    pub updated: u64,
    /// Rows rejected, with line numbers.
    pub rejected: Vec<Rejected>,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "rows read: {}", self.read)?;
        writeln!(f, "inserted:  {}", self.inserted)?;
        writeln!(f, "updated:   {}", self.updated)?;
        writeln!(f, "rejected:  {}", self.rejected.len())?;
        for r in &self.rejected {
            writeln!(f, "  line {}: {}", r.line, r.reason)?;
        }
        Ok(())
    }
}

/// Normalizes a phone number to E.164, or says why it is not a valid number.
pub(crate) fn normalize_phone(raw: &str, default_region: Option<phonenumber::country::Id>) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("phone is empty".into());
    }
    let number = phonenumber::parse(default_region, trimmed)
        .map_err(|e| format!("phone {trimmed:?} is not a phone number ({e})"))?;
    if !phonenumber::is_valid(&number) {
        return Err(format!("phone {trimmed:?} is not a valid number for its country"));
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

/// A row before phone validation. `None` (and absent attributes): not in the file.
#[derive(Debug, Default)]
struct RawRow {
    phone: String,
    name: Option<String>,
    tags: Option<Vec<String>>,
    attributes: Map<String, Value>,
    whatsapp_id: Option<String>,
}

/// A WhatsApp id as a person may write it (`+55 11 99999-9999`): its digits, 7 to 15
/// of them; blank means not given.
fn whatsapp_id(raw: &str) -> Result<Option<String>, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let digits: String = trimmed.chars().filter(|c| !matches!(c, '+' | ' ' | '-' | '(' | ')' | '.')).collect();
    if (7..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
        Ok(Some(digits))
    } else {
        Err(format!("whatsapp_id {trimmed:?} is not a WhatsApp id (7 to 15 digits)"))
    }
}

fn split_tags(raw: &str) -> Vec<String> {
    raw.split(['|', ';', ',']).map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect()
}

fn row_from_json(line: &str) -> Result<RawRow, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = value else { return Err("expected a JSON object".into()) };
    let phone = match obj.remove("phone") {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("phone must be a string".into()),
        None => return Err("missing field phone".into()),
    };
    let name = match obj.remove("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Some(Value::String(_) | Value::Null) | None => None,
        Some(_) => return Err("name must be a string".into()),
    };
    let tags = match obj.remove("tags") {
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|t| match t {
                    Value::String(s) => Ok(s),
                    _ => Err("tags must be strings".to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(Value::String(s)) => Some(split_tags(&s)),
        Some(Value::Null) | None => None,
        Some(_) => return Err("tags must be a list of strings".into()),
    };
    let attributes = match obj.remove("attributes") {
        Some(Value::Object(map)) => map,
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err("attributes must be an object".into()),
    };
    let whatsapp_id = match obj.remove("whatsapp_id") {
        Some(Value::String(s)) => whatsapp_id(&s)?,
        Some(Value::Number(n)) => whatsapp_id(&n.to_string())?,
        Some(Value::Null) | None => None,
        Some(_) => return Err("whatsapp_id must be a string".into()),
    };
    Ok(RawRow { phone, name, tags, attributes, whatsapp_id })
}

/// Validates and batches rows, upserting each full batch.
struct Loader<'a> {
    pool: &'a PgPool,
    organization: &'a str,
    region: Option<phonenumber::country::Id>,
    batch_size: usize,
    batch: Vec<ContactUpdate>,
    index: HashMap<String, usize>,
    report: ImportReport,
}

impl<'a> Loader<'a> {
    async fn accept(&mut self, line: u64, row: Result<RawRow, String>) -> anyhow::Result<()> {
        self.report.read += 1;
        let row = match row {
            Ok(row) => row,
            Err(reason) => {
                self.report.rejected.push(Rejected { line, reason });
                return Ok(());
            }
        };
        let phone = match normalize_phone(&row.phone, self.region) {
            Ok(p) => p,
            Err(reason) => {
                self.report.rejected.push(Rejected { line, reason });
                return Ok(());
            }
        };
        let contact = ContactUpdate {
            phone: phone.clone(),
            name: row.name,
            tags: row.tags,
            attributes: row.attributes,
            whatsapp_id: row.whatsapp_id,
        };
        // One statement cannot upsert the same row twice: a phone repeated within a batch
        // is folded into its earlier row (what the later row gives wins), and counts as
        // an update.
        if let Some(&at) = self.index.get(&phone) {
            self.batch[at].merge(contact);
            self.report.updated += 1;
        } else {
            self.index.insert(phone, self.batch.len());
            self.batch.push(contact);
        }
        if self.batch.len() >= self.batch_size {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let done =
            contacts::upsert_given(self.pool, self.organization, &self.batch).await.context("upserting contacts")?;
        self.report.inserted += done.inserted;
        self.report.updated += done.updated;
        self.batch.clear();
        self.index.clear();
        Ok(())
    }
}

/// The file's text with the line breaks an editor sees turned into `\n` (CRLF and a lone
/// CR alike) and a leading UTF-8 byte-order mark dropped. The CSV reader counts lines
/// by `\n` and ends a record at the `\r` of a CRLF, so it reported every row after the
/// first CRLF one line too early, and a CR-only file as one line; on this text its line
/// numbers are the editor's. A CRLF inside a quoted field becomes `\n` as well.
struct EditorLines<R> {
    inner: R,
    /// Bytes read from `inner`, transformed, and not yet handed out (from `out_at` on).
    out: Vec<u8>,
    out_at: usize,
    scratch: Vec<u8>,
    /// The last byte read was a CR: whether it ends a CRLF depends on the next byte.
    pending_cr: bool,
    bom_checked: bool,
}

impl<R: Read> EditorLines<R> {
    const CHUNK: usize = 64 * 1024;

    fn new(inner: R) -> Self {
        Self { inner, out: Vec::new(), out_at: 0, scratch: vec![0; Self::CHUNK], pending_cr: false, bom_checked: false }
    }

    /// Reads into `out` until it holds something or the input ends.
    fn fill(&mut self) -> std::io::Result<()> {
        self.out.clear();
        self.out_at = 0;
        while self.out.is_empty() {
            let mut n = self.read_some(0)?;
            if !self.bom_checked {
                // the mark is three bytes; a short first read must not hide it
                while n < 3 {
                    let more = self.read_some(n)?;
                    if more == n {
                        break;
                    }
                    n = more;
                }
                self.bom_checked = true;
                let start = if self.scratch[..n].starts_with(b"\xEF\xBB\xBF") { 3 } else { 0 };
                self.transform(start, n);
            } else {
                self.transform(0, n);
            }
            if n == 0 {
                if std::mem::take(&mut self.pending_cr) {
                    self.out.push(b'\n');
                }
                break;
            }
        }
        Ok(())
    }

    /// Reads once into `scratch[from..]`; returns how much of `scratch` is filled.
    fn read_some(&mut self, from: usize) -> std::io::Result<usize> {
        loop {
            match self.inner.read(&mut self.scratch[from..]) {
                Ok(n) => return Ok(from + n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn transform(&mut self, from: usize, to: usize) {
        for &byte in &self.scratch[from..to] {
            if std::mem::take(&mut self.pending_cr) {
                self.out.push(b'\n');
                if byte == b'\n' {
                    continue;
                }
            }
            if byte == b'\r' {
                self.pending_cr = true;
            } else {
                self.out.push(byte);
            }
        }
    }
}

impl<R: Read> Read for EditorLines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.out_at >= self.out.len() {
            self.fill()?;
        }
        let available = &self.out[self.out_at..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.out_at += n;
        Ok(n)
    }
}

/// Counts bytes read so the progress bar can follow the file without knowing the rows.
struct Counted<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{spinner} importing [{bar:40}] {bytes}/{total_bytes} ({eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn guess_format(path: &Path) -> InputFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson" | "json") => InputFormat::Jsonl,
        _ => InputFormat::Csv,
    }
}

/// Imports a file into an organization and returns the report (rejected rows do not
/// stop the import).
pub async fn import_file(
    pool: &PgPool,
    organization: &str,
    path: &Path,
    format: Option<InputFormat>,
    default_region: Option<&str>,
    batch_size: usize,
) -> anyhow::Result<ImportReport> {
    let region = match default_region {
        Some(code) => Some(
            code.to_ascii_uppercase()
                .parse::<phonenumber::country::Id>()
                .map_err(|_| anyhow::anyhow!("unknown region {code:?}"))?,
        ),
        None => None,
    };
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len);
    let reader = BufReader::new(EditorLines::new(BufReader::new(Counted { inner: file, bar: bar.clone() })));
    let mut loader = Loader {
        pool,
        organization,
        region,
        batch_size: batch_size.max(1),
        batch: Vec::with_capacity(batch_size.max(1)),
        index: HashMap::new(),
        report: ImportReport::default(),
    };
    match format.unwrap_or_else(|| guess_format(path)) {
        InputFormat::Jsonl => {
            for (i, line) in reader.lines().enumerate() {
                let line = line.with_context(|| format!("reading line {}", i + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                loader.accept(i as u64 + 1, row_from_json(&line)).await?;
            }
        }
        InputFormat::Csv => {
            let mut csv = csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_reader(reader);
            let headers: Vec<String> =
                csv.headers().context("reading the CSV header")?.iter().map(|h| h.to_ascii_lowercase()).collect();
            let Some(phone_col) = headers.iter().position(|h| h == "phone") else {
                bail!("the CSV header has no 'phone' column (found: {})", headers.join(", "));
            };
            let mut record = csv::StringRecord::new();
            loop {
                let line = csv.position().line() + 1;
                match csv.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {
                        let line = record.position().map_or(line, |p| p.line());
                        let row = row_from_csv(&headers, phone_col, &record);
                        loader.accept(line, row).await?;
                    }
                    Err(e) => {
                        let line = e.position().map_or(line, |p| p.line());
                        loader.accept(line, Err(format!("unreadable CSV row: {e}"))).await?;
                    }
                }
            }
        }
    }
    loader.flush().await?;
    bar.finish_and_clear();
    Ok(loader.report)
}

fn row_from_csv(headers: &[String], phone_col: usize, record: &csv::StringRecord) -> Result<RawRow, String> {
    if record.len() != headers.len() {
        return Err(format!("expected {} fields, found {}", headers.len(), record.len()));
    }
    let mut row = RawRow { phone: record.get(phone_col).unwrap_or_default().to_owned(), ..Default::default() };
    for (header, value) in headers.iter().zip(record.iter()) {
        match header.as_str() {
            "phone" => {}
            "name" => row.name = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "tags" => row.tags = Some(split_tags(value)),
            "whatsapp_id" => row.whatsapp_id = whatsapp_id(value)?,
            key if !value.is_empty() => {
                row.attributes.insert(key.to_owned(), Value::String(value.to_owned()));
            }
            _ => {}
        }
    }
    Ok(row)
}

/// The namespace's own database credential, read with the caller's Kubernetes rights:
/// (URL, organization id, CA bundle). `purpose` completes "so you may not ..." when the
/// caller may not read it.
async fn namespace_credential(namespace: &str, purpose: &str) -> anyhow::Result<(String, String, Option<String>)> {
    use crate::controller::tenant::{CA_KEY, DATABASE_SECRET, ORGANIZATION_KEY, URL_KEY};
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API (kubeconfig)")?;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, namespace);
    let secret = match secrets.get_opt(DATABASE_SECRET).await {
        Ok(Some(secret)) => secret,
        Ok(None) => bail!(
            "namespace {namespace:?} has no Disparo database credential yet (Secret {DATABASE_SECRET}): create a Channel there first; the controller writes it within seconds"
        ),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            bail!(
                "you may not read Secret {DATABASE_SECRET} in namespace {namespace:?}, so you may not {purpose} there ({})",
                e.message
            )
        }
        Err(e) => return Err(e).context(format!("reading Secret {DATABASE_SECRET} in namespace {namespace:?}")),
    };
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .with_context(|| format!("Secret {DATABASE_SECRET} in {namespace:?} has no key {key:?}"))
    };
    Ok((value(URL_KEY)?, value(ORGANIZATION_KEY)?, value(CA_KEY).ok()))
}

/// A pool on the organization of `namespace` and its id. Without `admin_url`, through
/// the namespace's own credential (the `disparo-database` Secret, read with the
/// caller's Kubernetes rights, its CA bundle verifying the server and its URL's
/// `sslmode` as the controller wrote it), so row-level security confines the caller to
/// that organization; with it, the operator's escape hatch.
pub(crate) async fn organization_pool(
    namespace: &str,
    admin_url: Option<&str>,
    purpose: &str,
    max_connections: u32,
) -> anyhow::Result<(PgPool, String)> {
    let (url, organization, ca) = match admin_url {
        Some(url) => {
            let pool = crate::store::connect(url, 1).await.context("connecting to Postgres")?;
            let organization = crate::store::tenancy::organization_of(&pool, namespace).await?.with_context(|| {
                format!("namespace {namespace:?} has no organization yet: create a Channel there first")
            })?;
            pool.close().await;
            (url.to_owned(), organization, None)
        }
        None => namespace_credential(namespace, purpose).await?,
    };
    let pool = match &ca {
        Some(pem) => crate::store::connect_with_ca(&url, max_connections, pem).await,
        None => crate::store::connect(&url, max_connections).await,
    }
    .context("connecting to Postgres")?;
    Ok((pool, organization))
}

/// Runs the command: imports, prints the report, fails when any row was rejected.
pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let (pool, organization) =
        organization_pool(&args.namespace, args.admin_database_url.as_deref(), "import contacts", 4).await?;
    let report =
        import_file(&pool, &organization, &args.file, args.format, args.default_region.as_deref(), args.batch_size)
            .await?;
    print!("{report}");
    if !report.rejected.is_empty() {
        bail!("{} row(s) rejected; the other rows were imported", report.rejected.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalize_to_e164() {
        assert_eq!(normalize_phone("+55 11 99999-9999", None).unwrap(), "+5511999999999");
        assert_eq!(normalize_phone("(11) 99999-9999", Some(phonenumber::country::Id::BR)).unwrap(), "+5511999999999");
        assert_eq!(normalize_phone("+1 650-253-0000", None).unwrap(), "+16502530000");
    }

    #[test]
    fn bad_phones_say_why() {
        assert!(normalize_phone("", None).unwrap_err().contains("empty"));
        assert!(normalize_phone("hello", None).is_err());
        assert!(normalize_phone("+55 11 123", None).unwrap_err().contains("not a valid number"));
        // no country code and no default region
        assert!(normalize_phone("11999999999", None).is_err());
    }

    #[test]
    fn json_rows_parse_and_reject_clearly() {
        let row = row_from_json(r#"{"phone":"+5511999999999","name":"Ana","tags":["vip"],"attributes":{"city":"SP"}}"#)
            .unwrap();
        assert_eq!(row.tags, Some(vec!["vip".to_owned()]));
        assert_eq!(row.attributes["city"], "SP");
        assert_eq!(row_from_json(r#"{"name":"x"}"#).unwrap_err(), "missing field phone");
        assert!(row_from_json("{").unwrap_err().starts_with("invalid JSON"));
        let bare =
            row_from_json(r#"{"phone":"+5511999999999","tags":null,"whatsapp_id":"+55 11 99999-9999"}"#).unwrap();
        assert_eq!(
            (bare.name, bare.tags, bare.whatsapp_id.as_deref()),
            (None, None, Some("5511999999999")),
            "absent fields are not given"
        );
        assert!(row_from_json(r#"{"phone":"1","whatsapp_id":"abc"}"#).unwrap_err().contains("whatsapp_id"));
    }

    fn editor_text(input: &[u8], chunk: usize) -> Vec<u8> {
        /// Hands out at most `chunk` bytes a read, as a slow pipe would.
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        EditorLines::new(Trickle(input, chunk)).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn editor_lines_are_lf_lines_without_a_byte_order_mark() {
        for chunk in [1, 2, 3, 4, 7, 1 << 20] {
            for (input, expected) in [
                (&b"a\r\nb\r\n"[..], &b"a\nb\n"[..]),
                (b"a\rb\r", b"a\nb\n"),
                (b"a\r\r\nb", b"a\n\nb"),
                (b"\xEF\xBB\xBFa\r\nb", b"a\nb"),
                (b"\xEF\xBB\xBF", b""),
                (b"\xEF\xBB", b"\xEF\xBB"),
                (b"a\xEF\xBB\xBF", b"a\xEF\xBB\xBF"),
                (b"\"x\r\ny\"\r", b"\"x\ny\"\n"),
                (b"", b""),
                (b"\r", b"\n"),
            ] {
                assert_eq!(
                    editor_text(input, chunk),
                    expected,
                    "{:?} in reads of {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn whatsapp_ids_are_digits() {
        assert_eq!(whatsapp_id(" 5511999999999 "), Ok(Some("5511999999999".into())));
        assert_eq!(whatsapp_id("+1 (555) 012-3456"), Ok(Some("15550123456".into())));
        assert_eq!(whatsapp_id(""), Ok(None));
        assert!(whatsapp_id("12345").is_err());
        assert!(whatsapp_id("55119999x9999").is_err());
    }

    #[test]
    fn tags_split_on_common_separators() {
        assert_eq!(split_tags("vip| sp ;new,"), vec!["vip", "sp", "new"]);
    }
}
