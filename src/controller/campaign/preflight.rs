//! Preflight: the audience and the message are checked, then the audience is frozen.

use super::*;
use crate::sender::MessageTemplate;

/// Checks the audience and message, then freezes the audience. `Ok(Err(why))` is a
/// preflight failure a person must fix.
pub(super) async fn preflight(
    campaign: &Campaign,
    channel: Option<&Channel>,
    ctx: &Context,
    organization: &str,
    name: &str,
    uid: Uuid,
    status: &mut CampaignStatus,
) -> Result<std::result::Result<(), String>> {
    let query = match AudienceQuery::from_spec(&campaign.spec.audience) {
        Ok(q) => q,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let size = match store::audience::preview_size(&ctx.pool, organization, &query).await {
        Ok(n) => n,
        Err(store::Error::SourceCampaignNotFound { name, .. }) => {
            return Ok(Err(format!("audience.fromCampaign names {name:?}, which never ran in this namespace")));
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(channel), Some(_)) = (channel, &campaign.spec.message.template)
        && channel.spec.provider == Provider::Evolution
    {
        return Ok(Err(format!(
            "spec.message.template: channel {:?} uses the Evolution API, which has no templates; send spec.message.text instead (pause, edit, resume)",
            campaign.spec.channel_ref.name
        )));
    }
    let message = MessageTemplate::from_spec(&campaign.spec.message);
    let texts = message.as_ref().map(MessageTemplate::rendered_texts).unwrap_or_default();
    let mut needs_name = false;
    let mut keys = Vec::new();
    for text in &texts {
        for var in render::variables(text) {
            match var {
                render::Variable::Name => needs_name = true,
                render::Variable::Phone => {}
                render::Variable::Attribute(key) => keys.push(key),
            }
        }
    }
    // A contact that has every variable must render; if not, the message itself is broken.
    let sample_attributes =
        serde_json::Value::Object(keys.iter().map(|k| (k.clone(), serde_json::Value::from("x"))).collect());
    let sample = render::ContactView { name: Some("x"), phone: "+5511999999999", attributes: &sample_attributes };
    for text in &texts {
        if let Err(e) = render::render(text, &sample) {
            return Ok(Err(format!("the message cannot render: {e}")));
        }
    }
    let missing = store::audience::count_missing_variables(&ctx.pool, organization, &query, needs_name, &keys).await?;
    let sharing =
        store::campaigns::active_on_channel(&ctx.pool, organization, &campaign.spec.channel_ref.name, uid).await?;
    let estimate = match channel {
        Some(channel) => {
            let limits = store::rate::Limits::effective(channel.spec.provider, &channel.spec.rate_limits);
            let window = view::window_fraction(campaign.spec.schedule.as_ref().and_then(|s| s.window.as_ref()));
            view::estimated_duration_seconds(size, &limits, sharing, window)
        }
        None => None,
    };
    let category = message.as_ref().and_then(MessageTemplate::category);
    let priced = match category {
        Some(category) => super::super::cost::estimate(ctx, organization, &query, category.as_pricing()).await?,
        None => None,
    };
    let messaging_limit = match channel.and_then(|ch| ch.spec.meta.as_ref().map(|m| (ch, m))) {
        Some((ch, meta)) if meta.business_portfolio.is_some() && category.is_some() => {
            let account = store::account::account(&ctx.pool, organization, &ch.name_any()).await?;
            Some(super::super::cost::messaging_limit_note(size, account.tier.as_deref(), account.daily_limit))
        }
        _ => None,
    };
    status.preflight = Some(Preflight {
        audience_size: size,
        missing_variables: missing,
        estimated_duration_seconds: estimate,
        sharing_channel_with: sharing as i32,
        estimated_cost: priced.as_ref().map(|(_, cost)| cost.total),
        currency: priced.as_ref().map(|(card, _)| card.currency.clone()),
        messaging_limit,
    });
    if let (Some((card, cost)), Some(max)) = (&priced, campaign.spec.budget.as_ref().and_then(|b| b.max_cost))
        && cost.total >= max
    {
        return Ok(Err(format!(
            "the audience would cost an estimated {:.2} {} (rate card {}), which reaches spec.budget.maxCost {max:.2}: narrow the audience or raise the budget",
            cost.total, card.currency, card.version
        )));
    }
    if size == 0 {
        return Ok(Err("the audience is empty after opt-outs and de-duplication: nothing to send".into()));
    }
    if missing == size {
        return Ok(Err(format!(
            "no contact of the audience has every variable the message uses ({missing} of {size} lack one)"
        )));
    }
    let key = store::audience::CampaignKey {
        uid,
        organization,
        name,
        channel: &campaign.spec.channel_ref.name,
        batch_size: campaign.spec.execution.batch_size,
    };
    // The cap counts marketing messages: a campaign sending another category is not capped.
    let cap = campaign
        .spec
        .frequency_cap
        .as_ref()
        .filter(|_| category == Some(crate::api::TemplateCategory::Marketing))
        .map(|c| store::audience::FrequencyCap { messages: c.messages, days: c.days });
    let frozen = store::audience::materialize_capped(&ctx.pool, &key, &query, cap).await?;
    status.audience = Some(AudienceStatus {
        frozen_at: Some(time::k8s(Utc::now())),
        frozen_generation: campaign.metadata.generation,
        size: frozen.messages,
        drift: None,
    });
    if frozen.newly_frozen {
        publish(
            ctx,
            campaign,
            EventType::Normal,
            "AudienceFrozen",
            format!("{} messages in {} batches", frozen.messages, frozen.batches),
        )
        .await;
    }
    Ok(Ok(()))
}
