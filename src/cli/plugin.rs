//! The kubectl plugin (`kubectl disparo ...`, the same binary named `kubectl-disparo`):
//! a person's view of a campaign and the verbs they use on it.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::api::{AudienceStatus, Campaign, CampaignSpec, ErrorCode, FromCampaign, Phase, SourceMessageStatus};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    /// A view for people.
    #[default]
    Text,
    /// The Campaign as JSON.
    Json,
    /// The Campaign as YAML.
    Yaml,
}

/// Which campaign.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Campaign name.
    pub name: String,
    /// Namespace (default: the kubeconfig's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// `kubectl disparo status NAME`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Keep watching until the campaign reaches a final phase, then print the view (a
    /// progress bar meanwhile on a terminal; a script just waits).
    #[arg(long, short = 'w')]
    watch: bool,
}

/// `kubectl disparo cancel NAME`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    target: Target,
    /// Do not ask for confirmation (required when not on a terminal: without it, cancel
    /// refuses).
    #[arg(long, short = 'y')]
    yes: bool,
}

/// `kubectl disparo retry-failed NAME`.
#[derive(Debug, clap::Args)]
pub struct RetryFailedArgs {
    #[command(flatten)]
    target: Target,
    /// Name of the new campaign (default: NAME-retry).
    #[arg(long)]
    new_name: Option<String>,
    /// Create it suspended (a Draft) to review first.
    #[arg(long)]
    suspended: bool,
    /// Which of its messages, by status (comma-separated: failed, sent, delivered, read,
    /// unknown, cancelled).
    #[arg(long, value_delimiter = ',', value_parser = SourceMessageStatus::parse, default_value = "failed")]
    status: Vec<SourceMessageStatus>,
    /// Only those whose last error has one of these codes (comma-separated, e.g.
    /// 131026,131049); the new campaign's `fromCampaign.errorCodes`.
    #[arg(long, value_delimiter = ',', value_parser = ErrorCode::parse)]
    reason: Vec<ErrorCode>,
}

async fn api(namespace: Option<&str>) -> anyhow::Result<Api<Campaign>> {
    let client = Client::try_default().await.context("connecting to the Kubernetes API (is KUBECONFIG set?)")?;
    Ok(match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    })
}

pub(crate) async fn get(api: &Api<Campaign>, name: &str) -> anyhow::Result<Campaign> {
    match api.get_opt(name).await? {
        Some(c) => Ok(c),
        None => bail!("campaign {name:?} not found (kubectl get campaigns lists them)"),
    }
}

/// Renders what Meta says of the campaign's channel: tier, quality, budget.
pub(crate) fn render_account(channel: &crate::api::Channel) -> String {
    let Some(account) = channel.status.as_ref().and_then(|s| s.account.as_ref()) else { return String::new() };
    let mut out = format!(
        "Account   tier {}  quality {}  throughput {}\n",
        account.tier.as_deref().unwrap_or("unknown"),
        account.quality_rating.as_deref().unwrap_or("unknown"),
        account.throughput_level.as_deref().unwrap_or("unknown"),
    );
    if let Some(budget) = &account.budget {
        out.push_str(&format!(
            "Budget    {} of {} unique recipients in 24 h (portfolio {})",
            budget.used_24h,
            budget.limit.map_or("unlimited".to_owned(), |l| l.to_string()),
            budget.portfolio
        ));
        if let Some(at) = &budget.resets_at {
            out.push_str(&format!(
                "  oldest leaves {}",
                crate::api::time::instant(&at.0).format("%Y-%m-%d %H:%M:%S UTC")
            ));
        }
        out.push('\n');
    }
    if let Some(until) = &account.restricted_until {
        out.push_str(&format!(
            "Restricted until {}\n",
            crate::api::time::instant(&until.0).format("%Y-%m-%d %H:%M:%S UTC")
        ));
    }
    out
}

/// Renders the human view of a campaign.
pub(crate) fn render_status(campaign: &Campaign, events: &[Event]) -> String {
    let mut out = String::new();
    let status = campaign.status.clone().unwrap_or_default();
    let phase = status.phase.map_or("Pending".to_owned(), |p| p.to_string());
    let counts = status.messages.clone().unwrap_or_default();
    out.push_str(&format!("Campaign  {}/{}\n", campaign.namespace().unwrap_or_default(), campaign.name_any()));
    out.push_str(&format!("Channel   {}\n", campaign.spec.channel_ref.name));
    out.push_str(&format!("Phase     {phase}\n"));
    if let Some(p) = &status.progress {
        out.push_str(&format!("Progress  {}  {:.1} msg/min", p.percentage, p.rate_per_minute));
        if let Some(eta) = &p.eta {
            out.push_str(&format!("  ETA {}", crate::api::time::instant(&eta.0).format("%Y-%m-%d %H:%M:%S UTC")));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "Messages  total {}  pending {}  sent {}  delivered {}  read {}  failed {}  unknown {}  skipped {}  cancelled {}\n",
        counts.total, counts.pending, counts.sent, counts.delivered, counts.read, counts.failed, counts.unknown, counts.skipped, counts.cancelled
    ));
    if let Some(r) = &status.rates {
        out.push_str(&format!(
            "Rates     delivery {:.1}%  read {:.1}%  failure {:.1}%\n",
            r.delivery * 100.0,
            r.read * 100.0,
            r.failure * 100.0
        ));
    }
    if let Some(r) = &status.retries {
        out.push_str(&format!(
            "Retries   first attempt {}  after retry {}  permanent failures {}  retries scheduled {}\n",
            r.succeeded_first_attempt, r.succeeded_after_retry, r.permanent_failures, r.retries_scheduled
        ));
        if !r.errors.is_empty() {
            out.push_str("Errors\n");
            for e in &r.errors {
                out.push_str(&format!("  {:<12} {}\n", e.code, e.count));
            }
        }
    }
    if let Some(rl) = &status.rate_limit {
        out.push_str(&format!("Rate limit pauses {}", rl.pauses));
        if let Some(at) = &rl.resume_at {
            out.push_str(&format!("  resumes at {}", crate::api::time::instant(&at.0).format("%Y-%m-%d %H:%M:%S UTC")));
        }
        out.push('\n');
    }
    if counts.marketing_limited > 0 {
        out.push_str(&format!(
            "Held      {} withheld by Meta's per-user marketing limit (131049), sent again after 24 h, 48 h, 96 h\n",
            counts.marketing_limited
        ));
    }
    if let Some(cost) = &status.cost {
        let by: Vec<String> = cost.by_category.iter().map(|(c, v)| format!("{c} {v:.2}")).collect();
        out.push_str(&format!(
            "Cost      {:.2} {} estimated for {} billable messages ({}; rate card {})\n",
            cost.estimated,
            cost.currency,
            cost.billable_messages,
            if by.is_empty() { "none yet".to_owned() } else { by.join(", ") },
            cost.rate_card_version
        ));
    }
    if let Some(AudienceStatus { drift: Some(drift), .. }) = &status.audience {
        out.push_str(&format!("Note      {drift}\n"));
    }
    for c in status.conditions.iter().filter(|c| c.type_ == "Stalled" && c.status == "True") {
        out.push_str(&format!("Stalled   {}: {}\n", c.reason, c.message));
    }
    for c in status.conditions.iter().filter(|c| c.type_ == "Held" && c.status == "True") {
        out.push_str(&format!("Held      {}: {}\n", c.reason, c.message));
    }
    if !events.is_empty() {
        out.push_str("Recent events\n");
        for e in events.iter().rev().take(8) {
            out.push_str(&format!(
                "  {:<8} {:<24} {}\n",
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            ));
        }
    }
    out
}

fn bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stdout());
    if let Ok(style) = ProgressStyle::with_template("[{bar:40}] {pos}/{len} finished ({msg})") {
        bar.set_style(style.progress_chars("#>-"));
    }
    bar
}

fn finished(campaign: &Campaign) -> u64 {
    let m = campaign.status.as_ref().and_then(|s| s.messages.clone()).unwrap_or_default();
    (m.sent + m.failed + m.unknown + m.skipped + m.cancelled).max(0) as u64
}

async fn recent_events(client: Client, campaign: &Campaign) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client, &campaign.namespace().unwrap_or_default());
    let selector = format!("involvedObject.kind=Campaign,involvedObject.name={}", campaign.name_any());
    match api.list(&ListParams::default().fields(&selector)).await {
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0).or(e.event_time.as_ref().map(|t| t.0)));
            items
        }
        Err(_) => Vec::new(),
    }
}

/// `status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let api = api(args.target.namespace.as_deref()).await?;
    let campaign = get(&api, &args.target.name).await?;
    match args.output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&campaign)?);
            return Ok(());
        }
        Output::Yaml => {
            print!("{}", serde_yaml::to_string(&campaign)?);
            return Ok(());
        }
        Output::Text => {}
    }
    let client = Client::try_default().await?;
    // Off a terminal the bar draws nothing (indicatif hides it) and the command still
    // waits, so a script can use `-w` to wait for the end.
    if args.watch {
        let total = campaign.status.as_ref().and_then(|s| s.messages.clone()).map_or(0, |m| m.total) as u64;
        let progress = bar(total);
        loop {
            let current = get(&api, &args.target.name).await?;
            let phase = current.status.as_ref().and_then(|s| s.phase);
            let total = current.status.as_ref().and_then(|s| s.messages.clone()).map_or(0, |m| m.total) as u64;
            progress.set_length(total.max(1));
            progress.set_position(finished(&current));
            progress.set_message(phase.map_or("Pending".into(), |p| p.to_string()));
            if phase.is_some_and(Phase::is_terminal) {
                progress.finish();
                let events = recent_events(client.clone(), &current).await;
                print!("{}", render_status(&current, &events));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let events = recent_events(client.clone(), &campaign).await;
    let channels: Api<crate::api::Channel> = Api::namespaced(client, &campaign.namespace().unwrap_or_default());
    let account = match channels.get_opt(&campaign.spec.channel_ref.name).await {
        Ok(Some(channel)) => render_account(&channel),
        _ => String::new(),
    };
    if std::io::stdout().is_terminal() {
        let total = campaign.status.as_ref().and_then(|s| s.messages.clone()).map_or(0, |m| m.total) as u64;
        let progress = bar(total);
        progress.set_position(finished(&campaign));
        progress
            .set_message(campaign.status.as_ref().and_then(|s| s.phase).map_or("Pending".into(), |p| p.to_string()));
        progress.abandon();
    }
    print!("{}{account}", render_status(&campaign, &events));
    Ok(())
}

async fn set_spec(target: &Target, patch: serde_json::Value, done: &str) -> anyhow::Result<()> {
    patch_campaign(target, json!({ "spec": patch }), done).await
}

async fn patch_campaign(target: &Target, patch: serde_json::Value, done: &str) -> anyhow::Result<()> {
    let api = api(target.namespace.as_deref()).await?;
    get(&api, &target.name).await?;
    api.patch(&target.name, &PatchParams::default(), &Patch::Merge(patch)).await.map_err(|e| match e {
        kube::Error::Api(s) => anyhow::anyhow!("the API server refused: {}", s.message),
        other => other.into(),
    })?;
    println!("campaign {} {done}", target.name);
    Ok(())
}

/// `pause`.
pub async fn pause(target: Target) -> anyhow::Result<()> {
    set_spec(
        &target,
        json!({"suspend": true}),
        "paused (the sending Job is suspended; `kubectl disparo resume` continues it)",
    )
    .await
}

/// `resume`: clears `spec.suspend` and sets the resume annotation, which lifts what the
/// operator paused by itself (the failure threshold), a stop of the campaign's message
/// or of its channel by the provider, and restarts a Failed campaign's remaining
/// messages: a person resuming has fixed the cause.
pub async fn resume(target: Target) -> anyhow::Result<()> {
    let requested = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let patch = json!({
        "metadata": {"annotations": {crate::api::RESUME_ANNOTATION: requested}},
        "spec": {"suspend": false},
    });
    patch_campaign(
        &target,
        patch,
        "resumed (automatic pauses and provider stops are lifted; a failed campaign sends what is left)",
    )
    .await
}

/// `cancel`.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("cancel is irreversible: pass --yes to confirm when not on a terminal");
        }
        print!(
            "Cancel campaign {}? Unsent messages will never be sent. This cannot be undone. [y/N] ",
            args.target.name
        );
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("not cancelled");
            return Ok(());
        }
    }
    set_spec(&args.target, json!({"cancel": true}), "cancelled").await
}

/// The campaign that retries `source`'s messages in `statuses` whose last error has one
/// of `codes` (any error when empty); each status and code once.
pub(crate) fn retry_campaign(
    source: &Campaign,
    name: &str,
    suspended: bool,
    statuses: &[SourceMessageStatus],
    codes: &[ErrorCode],
) -> Campaign {
    let mut unique_statuses: Vec<SourceMessageStatus> = Vec::new();
    for status in statuses {
        if !unique_statuses.contains(status) {
            unique_statuses.push(*status);
        }
    }
    let mut unique_codes: Vec<ErrorCode> = Vec::new();
    for code in codes {
        if !unique_codes.contains(code) {
            unique_codes.push(code.clone());
        }
    }
    let spec = CampaignSpec {
        audience: crate::api::Audience {
            all_contacts: None,
            tags: None,
            segment: None,
            contacts: None,
            from_campaign: Some(FromCampaign {
                name: source.name_any(),
                statuses: unique_statuses,
                error_codes: unique_codes,
            }),
        },
        suspend: suspended,
        cancel: false,
        schedule: None,
        ..source.spec.clone()
    };
    let mut campaign = Campaign::new(name, spec);
    campaign.metadata.namespace = source.namespace();
    campaign.metadata.labels = Some([("disparo.io/retry-of".to_owned(), source.name_any())].into_iter().collect());
    campaign
}

/// "the failed or unknown messages of spring whose last error is 131026 or 131049".
pub(crate) fn aimed_at(source: &str, statuses: &[SourceMessageStatus], codes: &[ErrorCode]) -> String {
    let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    let mut out = format!("the {} messages of {source}", statuses.join(" or "));
    if !codes.is_empty() {
        let codes: Vec<&str> = codes.iter().map(|c| c.0.as_str()).collect();
        out.push_str(&format!(" whose last error is {}", codes.join(" or ")));
    }
    out
}

/// `retry-failed`.
pub async fn retry_failed(args: RetryFailedArgs) -> anyhow::Result<()> {
    let api = api(args.target.namespace.as_deref()).await?;
    let source = get(&api, &args.target.name).await?;
    let name = args.new_name.unwrap_or_else(|| format!("{}-retry", args.target.name));
    let campaign = retry_campaign(&source, &name, args.suspended, &args.status, &args.reason);
    let aimed = campaign
        .spec
        .audience
        .from_campaign
        .as_ref()
        .map(|from| aimed_at(&from.name, &from.statuses, &from.error_codes))
        .unwrap_or_default();
    api.create(&PostParams::default(), &campaign).await.map_err(|e| match e {
        kube::Error::Api(s) => anyhow::anyhow!("the API server refused: {}", s.message),
        other => other.into(),
    })?;
    println!("campaign {name} created: it sends to {aimed}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign() -> Campaign {
        serde_json::from_value(json!({
            "apiVersion": "disparo.io/v1alpha1", "kind": "Campaign",
            "metadata": {"name": "spring", "namespace": "acme"},
            "spec": {"channelRef": {"name": "main"}, "message": {"text": "hi"}, "audience": {"tags": {"anyOf": ["vip"]}}, "cancel": true},
            "status": {"phase": "Running", "messages": {"total": 12, "pending": 4, "sent": 6, "delivered": 3, "read": 1, "failed": 0, "unknown": 0, "cancelled": 0, "skipped": 2},
                       "progress": {"percentage": "60%", "ratePerMinute": 12.0},
                       "retries": {"succeededFirstAttempt": 5, "succeededAfterRetry": 1, "permanentFailures": 0, "retriesScheduled": 2, "errors": [{"code": "131000", "count": 2}]}}
        }))
        .unwrap()
    }

    #[test]
    fn the_status_view_shows_counts_and_errors() {
        let view = render_status(&campaign(), &[]);
        assert!(view.contains("Phase     Running"));
        assert!(view.contains("total 12  pending 4  sent 6"));
        assert!(view.contains("skipped 2"), "{view}");
        assert!(view.contains("131000       2"));
    }

    #[test]
    fn a_status_written_before_skipped_existed_still_reads() {
        let c: Campaign = serde_json::from_value(json!({
            "apiVersion": "disparo.io/v1alpha1", "kind": "Campaign",
            "metadata": {"name": "old", "namespace": "acme"},
            "spec": {"channelRef": {"name": "main"}, "message": {"text": "hi"}, "audience": {"allContacts": true}},
            "status": {"messages": {"total": 3, "pending": 0, "sent": 3, "delivered": 0, "read": 0, "failed": 0, "unknown": 0, "cancelled": 0}}
        }))
        .unwrap();
        assert_eq!(finished(&c), 3);
    }

    #[test]
    fn retry_failed_can_narrow_the_audience_by_status_and_error_code() {
        let statuses = [SourceMessageStatus::Failed, SourceMessageStatus::Unknown, SourceMessageStatus::Failed];
        let codes = [ErrorCode("131026".into()), ErrorCode("131049".into()), ErrorCode("131026".into())];
        let retry = retry_campaign(&campaign(), "spring-retry", true, &statuses, &codes);
        let from = retry.spec.audience.from_campaign.unwrap();
        assert_eq!(from.statuses, vec![SourceMessageStatus::Failed, SourceMessageStatus::Unknown], "once each");
        assert_eq!(from.error_codes, vec![ErrorCode("131026".into()), ErrorCode("131049".into())]);
        assert!(retry.spec.suspend);
        assert_eq!(
            aimed_at("spring", &from.statuses, &from.error_codes),
            "the failed or unknown messages of spring whose last error is 131026 or 131049"
        );
        assert_eq!(aimed_at("spring", &[SourceMessageStatus::Failed], &[]), "the failed messages of spring");
    }

    #[test]
    fn retry_failed_parses_its_filters_from_the_command_line() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: RetryFailedArgs,
        }
        let plain = Cli::try_parse_from(["x", "spring"]).unwrap().args;
        assert_eq!((plain.status, plain.reason), (vec![SourceMessageStatus::Failed], vec![]));
        let narrowed = Cli::try_parse_from(["x", "spring", "--status", "failed,unknown", "--reason", "131026,131049"])
            .unwrap()
            .args;
        assert_eq!(narrowed.status, vec![SourceMessageStatus::Failed, SourceMessageStatus::Unknown]);
        assert_eq!(narrowed.reason, vec![ErrorCode("131026".into()), ErrorCode("131049".into())]);
        let bad = Cli::try_parse_from(["x", "spring", "--status", "pending"]).err().unwrap().to_string();
        assert!(bad.contains("not a status a campaign can be aimed at"), "{bad}");
        assert!(Cli::try_parse_from(["x", "spring", "--reason", "a b"]).is_err());
    }

    #[test]
    fn retry_failed_targets_the_failed_messages_and_starts_clean() {
        let retry = retry_campaign(&campaign(), "spring-retry", false, &[SourceMessageStatus::Failed], &[]);
        let from = retry.spec.audience.from_campaign.unwrap();
        assert_eq!(from.name, "spring");
        assert_eq!(from.statuses, vec![SourceMessageStatus::Failed]);
        assert!(from.error_codes.is_empty());
        assert!(retry.spec.audience.tags.is_none());
        assert!(!retry.spec.cancel);
        assert_eq!(retry.metadata.namespace.as_deref(), Some("acme"));
    }
}
