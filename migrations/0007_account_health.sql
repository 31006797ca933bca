-- Account health: what Meta says about a number, its templates and its business
-- portfolio (polled from the Graph API by the controller, pushed by webhooks to the
-- webhook service), the portfolio's 24 h unique-recipient budget the senders keep,
-- the pricing of each delivered message, and business-scoped user ids
-- (docs/providers.md, "Account health signals").

-- What is known of a Channel's number. The webhook routes by WABA id and display
-- phone number, so the controller records them here with the channel's portfolio.
ALTER TABLE channel_state
    ADD COLUMN portfolio        TEXT,
    ADD COLUMN waba_id          TEXT,
    ADD COLUMN display_phone    TEXT,
    -- GREEN | YELLOW | RED | UNKNOWN, as last polled.
    ADD COLUMN quality_rating   TEXT,
    -- The last `phone_number_quality_update` event (FLAGGED, UNFLAGGED, DOWNGRADE, ...).
    ADD COLUMN quality_event    TEXT,
    -- FLAGGED or DOWNGRADE seen and not yet lifted by UNFLAGGED or UPGRADE.
    ADD COLUMN quality_flagged  BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN quality_changed_at TIMESTAMPTZ,
    -- STANDARD | HIGH.
    ADD COLUMN throughput_level TEXT;
CREATE INDEX channel_state_waba_idx ON channel_state (organization, waba_id) WHERE waba_id IS NOT NULL;

-- A business portfolio, as one organization's Channels name it: Meta's messaging limit
-- (unique recipients of business-initiated messages in a moving 24 h window, shared by
-- every number of the portfolio) and any restriction on business-initiated messaging.
CREATE TABLE portfolios (
    organization       TEXT        NOT NULL,
    portfolio          TEXT        NOT NULL,
    -- TIER_250 | TIER_2K | TIER_10K | TIER_100K | TIER_UNLIMITED (NULL: not known yet).
    tier               TEXT,
    -- Unique recipients per moving 24 h; NULL is unlimited.
    daily_limit        INTEGER     CHECK (daily_limit IS NULL OR daily_limit >= 0),
    -- Where the limit came from: `graph` (polled) or `webhook`.
    limit_source       TEXT,
    -- RESTRICTED_BIZ_INITIATED_MESSAGING until this instant (NULL: none, or none known).
    restricted_until   TIMESTAMPTZ,
    restriction        TEXT,
    -- The budget was found spent; it has room again at this instant.
    budget_spent_until TIMESTAMPTZ,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (organization, portfolio)
);

-- The recipients counted in a portfolio's moving window: one row per recipient, with
-- the last time a business-initiated message was sent to it. A recipient counts while
-- `last_sent_at` is within the last 24 h.
CREATE TABLE portfolio_recipients (
    organization TEXT        NOT NULL,
    portfolio    TEXT        NOT NULL,
    recipient    TEXT        NOT NULL,
    last_sent_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (organization, portfolio, recipient)
);
CREATE INDEX portfolio_recipients_window_idx ON portfolio_recipients (organization, portfolio, last_sent_at);

-- The last status Meta announced for a template (by WABA, name and language).
CREATE TABLE template_state (
    organization TEXT        NOT NULL,
    waba_id      TEXT        NOT NULL,
    name         TEXT        NOT NULL,
    language     TEXT        NOT NULL,
    -- APPROVED | PAUSED | DISABLED | REJECTED | FLAGGED | ... (NULL: only quality known).
    status       TEXT,
    reason       TEXT,
    -- GREEN | YELLOW | RED | UNKNOWN.
    quality      TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (organization, waba_id, name, language)
);

-- What Meta will charge for a message (from its status webhooks), and how many times
-- it was put back for Meta's per-user marketing limit (131049).
ALTER TABLE campaign_messages
    ADD COLUMN pricing_category   TEXT,
    ADD COLUMN pricing_type       TEXT,
    ADD COLUMN marketing_requeues SMALLINT NOT NULL DEFAULT 0;
CREATE INDEX campaign_messages_marketing_held_idx ON campaign_messages (campaign_uid)
    WHERE marketing_requeues > 0 AND status = 'pending';

-- The business-scoped user id Meta gives a contact (e.g. BR.1502576394655843).
ALTER TABLE contacts ADD COLUMN bsuid TEXT;
CREATE INDEX contacts_bsuid_idx ON contacts (organization, bsuid) WHERE bsuid IS NOT NULL;

-- A status that carries no provider message id the webhook knows, and no phone, is
-- kept by its BSUID for the sweep (see 0004).
ALTER TABLE unmatched_receipts ADD COLUMN IF NOT EXISTS bsuid TEXT;

-- Tenants: senders keep the budget; they read templates and portfolios.
GRANT SELECT, UPDATE (budget_spent_until, updated_at), INSERT ON portfolios TO disparo_tenant;
GRANT SELECT, INSERT, UPDATE, DELETE ON portfolio_recipients TO disparo_tenant;
GRANT SELECT ON template_state TO disparo_tenant;

ALTER TABLE portfolios ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON portfolios TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));
ALTER TABLE portfolio_recipients ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON portfolio_recipients TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));
ALTER TABLE template_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON template_state TO disparo_tenant
    USING (organization = (SELECT current_organization()));
