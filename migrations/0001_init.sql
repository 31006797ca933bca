-- Disparo's system of record.
--
-- The organization of every row is the Kubernetes namespace of the Campaign or Channel
-- it belongs to: it is never taken from a spec field a user could set.

CREATE TABLE contacts (
    id           BIGSERIAL PRIMARY KEY,
    organization TEXT        NOT NULL,
    phone        TEXT        NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    whatsapp_id  TEXT,
    name         TEXT,
    tags         TEXT[]      NOT NULL DEFAULT '{}',
    attributes   JSONB       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(attributes) = 'object'),
    opted_out    BOOLEAN     NOT NULL DEFAULT FALSE,
    opted_out_at TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (organization, phone)
);
CREATE INDEX contacts_tags_idx ON contacts USING GIN (tags);
CREATE INDEX contacts_attributes_idx ON contacts USING GIN (attributes jsonb_path_ops);
CREATE INDEX contacts_whatsapp_id_idx ON contacts (organization, whatsapp_id) WHERE whatsapp_id IS NOT NULL;

-- One row per Campaign object ever started (keyed by its UID, so a deleted and
-- re-created campaign of the same name is a different campaign).
CREATE TABLE campaigns (
    uid              UUID PRIMARY KEY,
    organization     TEXT        NOT NULL,
    name             TEXT        NOT NULL,
    channel          TEXT        NOT NULL,
    batch_size       INTEGER     NOT NULL CHECK (batch_size > 0),
    batches          INTEGER     NOT NULL DEFAULT 0,
    audience_frozen_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX campaigns_name_idx ON campaigns (organization, name, created_at DESC);

-- Message statuses. The order of the enum is not the lifecycle order; the allowed moves
-- are in message_transition_allowed below.
CREATE TYPE message_status AS ENUM (
    'pending',   -- waiting to be sent (first attempt or a scheduled retry)
    'sending',   -- claimed and marked just before the provider call
    'unknown',   -- the request may have reached the provider; never re-sent silently
    'sent',      -- accepted by the provider (has a provider message id)
    'delivered', -- on the recipient's device
    'read',      -- read by the recipient
    'failed',    -- failed for good (terminal)
    'cancelled'  -- never sent: the campaign was cancelled (terminal)
);

-- The forward-only rule, in SQL so that no writer (sender, webhook, person with psql)
-- can move a message backwards. `sending -> pending` is allowed only because a retry is
-- scheduled after the provider answered with an error, i.e. the message provably was
-- not sent.
CREATE FUNCTION message_transition_allowed(old message_status, new message_status)
RETURNS BOOLEAN LANGUAGE SQL IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE old
        WHEN 'pending'   THEN new IN ('sending', 'failed', 'cancelled')
        WHEN 'sending'   THEN new IN ('pending', 'unknown', 'sent', 'delivered', 'read', 'failed')
        WHEN 'unknown'   THEN new IN ('sent', 'delivered', 'read', 'failed')
        WHEN 'sent'      THEN new IN ('delivered', 'read', 'failed')
        WHEN 'delivered' THEN new IN ('read')
        ELSE FALSE
    END
$$;

CREATE TABLE campaign_messages (
    id                  BIGSERIAL PRIMARY KEY,
    campaign_uid        UUID           NOT NULL REFERENCES campaigns (uid) ON DELETE CASCADE,
    organization        TEXT           NOT NULL,
    contact_id          BIGINT         NOT NULL REFERENCES contacts (id) ON DELETE RESTRICT,
    batch_index         INTEGER        NOT NULL CHECK (batch_index >= 0),
    status              message_status NOT NULL DEFAULT 'pending',
    attempts            INTEGER        NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMPTZ    NOT NULL DEFAULT now(),
    provider_message_id TEXT,
    last_error_code     TEXT,
    last_error_message  TEXT,
    status_history      JSONB          NOT NULL DEFAULT '[]',
    created_at          TIMESTAMPTZ    NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ    NOT NULL DEFAULT now(),
    UNIQUE (campaign_uid, contact_id)
);
CREATE INDEX campaign_messages_due_idx
    ON campaign_messages (campaign_uid, batch_index, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX campaign_messages_batch_idx ON campaign_messages (campaign_uid, batch_index, status);
CREATE INDEX campaign_messages_provider_id_idx
    ON campaign_messages (organization, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

CREATE FUNCTION campaign_messages_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status AND NOT message_transition_allowed(OLD.status, NEW.status) THEN
        RAISE EXCEPTION 'message % cannot move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.campaign_uid <> OLD.campaign_uid OR NEW.contact_id <> OLD.contact_id OR NEW.organization <> OLD.organization THEN
        RAISE EXCEPTION 'message % cannot change campaign, contact or organization', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER campaign_messages_forward_only
    BEFORE UPDATE ON campaign_messages
    FOR EACH ROW EXECUTE FUNCTION campaign_messages_forward_only();

-- Per-campaign counters, one row per campaign, kept equal to a recount of
-- campaign_messages by statement-level triggers: they move in the same transaction as
-- the status changes and cost one row update per statement, however many rows it touched.
CREATE TABLE campaign_counters (
    campaign_uid             UUID PRIMARY KEY REFERENCES campaigns (uid) ON DELETE CASCADE,
    total                    BIGINT NOT NULL DEFAULT 0,
    pending                  BIGINT NOT NULL DEFAULT 0,
    sending                  BIGINT NOT NULL DEFAULT 0,
    unknown                  BIGINT NOT NULL DEFAULT 0,
    sent                     BIGINT NOT NULL DEFAULT 0,
    delivered                BIGINT NOT NULL DEFAULT 0,
    read                     BIGINT NOT NULL DEFAULT 0,
    failed                   BIGINT NOT NULL DEFAULT 0,
    cancelled                BIGINT NOT NULL DEFAULT 0,
    -- messages that reached `sent` (or beyond) on their first attempt / after a retry
    succeeded_first_attempt  BIGINT NOT NULL DEFAULT 0,
    succeeded_after_retry    BIGINT NOT NULL DEFAULT 0,
    -- retries scheduled (moves sending -> pending)
    retries_scheduled        BIGINT NOT NULL DEFAULT 0,
    first_sent_at            TIMESTAMPTZ,
    last_sent_at             TIMESTAMPTZ,
    updated_at               TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Failures by error code (every failure, retried or final, counted once per attempt).
CREATE TABLE campaign_error_counts (
    campaign_uid UUID   NOT NULL REFERENCES campaigns (uid) ON DELETE CASCADE,
    code         TEXT   NOT NULL,
    count        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_uid, code)
);

CREATE FUNCTION campaign_messages_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO campaign_counters AS c (campaign_uid, total, pending, sending, unknown, sent, delivered, read, failed, cancelled)
    SELECT campaign_uid, count(*),
           count(*) FILTER (WHERE status = 'pending'),
           count(*) FILTER (WHERE status = 'sending'),
           count(*) FILTER (WHERE status = 'unknown'),
           count(*) FILTER (WHERE status = 'sent'),
           count(*) FILTER (WHERE status = 'delivered'),
           count(*) FILTER (WHERE status = 'read'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM new_rows GROUP BY campaign_uid
    ON CONFLICT (campaign_uid) DO UPDATE SET
        total = c.total + EXCLUDED.total,
        pending = c.pending + EXCLUDED.pending,
        sending = c.sending + EXCLUDED.sending,
        unknown = c.unknown + EXCLUDED.unknown,
        sent = c.sent + EXCLUDED.sent,
        delivered = c.delivered + EXCLUDED.delivered,
        read = c.read + EXCLUDED.read,
        failed = c.failed + EXCLUDED.failed,
        cancelled = c.cancelled + EXCLUDED.cancelled,
        updated_at = now();
    RETURN NULL;
END $$;
CREATE TRIGGER campaign_messages_count_insert
    AFTER INSERT ON campaign_messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_insert();

CREATE FUNCTION campaign_messages_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH moved AS (
        SELECT n.campaign_uid, o.status AS old_status, n.status AS new_status,
               n.attempts, n.last_error_code AS new_code, o.last_error_code AS old_code,
               n.attempts <> o.attempts AS attempted
        FROM new_rows n JOIN old_rows o ON o.id = n.id
    ), deltas AS (
        SELECT campaign_uid,
            count(*) FILTER (WHERE new_status = 'pending')   - count(*) FILTER (WHERE old_status = 'pending')   AS d_pending,
            count(*) FILTER (WHERE new_status = 'sending')   - count(*) FILTER (WHERE old_status = 'sending')   AS d_sending,
            count(*) FILTER (WHERE new_status = 'unknown')   - count(*) FILTER (WHERE old_status = 'unknown')   AS d_unknown,
            count(*) FILTER (WHERE new_status = 'sent')      - count(*) FILTER (WHERE old_status = 'sent')      AS d_sent,
            count(*) FILTER (WHERE new_status = 'delivered') - count(*) FILTER (WHERE old_status = 'delivered') AS d_delivered,
            count(*) FILTER (WHERE new_status = 'read')      - count(*) FILTER (WHERE old_status = 'read')      AS d_read,
            count(*) FILTER (WHERE new_status = 'failed')    - count(*) FILTER (WHERE old_status = 'failed')    AS d_failed,
            count(*) FILTER (WHERE new_status = 'cancelled') - count(*) FILTER (WHERE old_status = 'cancelled') AS d_cancelled,
            count(*) FILTER (WHERE old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts <= 1) AS d_first,
            count(*) FILTER (WHERE old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts > 1) AS d_retried,
            count(*) FILTER (WHERE old_status = 'sending' AND new_status = 'pending') AS d_retries,
            bool_or(old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read')) AS any_sent
        FROM moved GROUP BY campaign_uid
    )
    UPDATE campaign_counters c SET
        pending = c.pending + d.d_pending,
        sending = c.sending + d.d_sending,
        unknown = c.unknown + d.d_unknown,
        sent = c.sent + d.d_sent,
        delivered = c.delivered + d.d_delivered,
        read = c.read + d.d_read,
        failed = c.failed + d.d_failed,
        cancelled = c.cancelled + d.d_cancelled,
        succeeded_first_attempt = c.succeeded_first_attempt + d.d_first,
        succeeded_after_retry = c.succeeded_after_retry + d.d_retried,
        retries_scheduled = c.retries_scheduled + d.d_retries,
        first_sent_at = CASE WHEN d.any_sent THEN coalesce(c.first_sent_at, now()) ELSE c.first_sent_at END,
        last_sent_at = CASE WHEN d.any_sent THEN now() ELSE c.last_sent_at END,
        updated_at = now()
    FROM deltas d
    WHERE c.campaign_uid = d.campaign_uid
      AND (d.d_pending, d.d_sending, d.d_unknown, d.d_sent, d.d_delivered, d.d_read, d.d_failed, d.d_cancelled, d.d_retries)
          IS DISTINCT FROM (0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint);

    -- every newly recorded error (a failed attempt or a final failure) counts once
    INSERT INTO campaign_error_counts AS e (campaign_uid, code, count)
    SELECT n.campaign_uid, n.last_error_code, count(*)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.last_error_code IS NOT NULL
      AND (n.status IN ('pending', 'failed', 'unknown') AND o.status IS DISTINCT FROM n.status
           OR n.status = 'failed' AND o.status = 'failed' AND n.last_error_code IS DISTINCT FROM o.last_error_code)
    GROUP BY n.campaign_uid, n.last_error_code
    ON CONFLICT (campaign_uid, code) DO UPDATE SET count = e.count + EXCLUDED.count;
    RETURN NULL;
END $$;
CREATE TRIGGER campaign_messages_count_update
    AFTER UPDATE ON campaign_messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_update();

CREATE FUNCTION campaign_messages_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE campaign_counters c SET
        total = c.total - d.n_total,
        pending = c.pending - d.n_pending,
        sending = c.sending - d.n_sending,
        unknown = c.unknown - d.n_unknown,
        sent = c.sent - d.n_sent,
        delivered = c.delivered - d.n_delivered,
        read = c.read - d.n_read,
        failed = c.failed - d.n_failed,
        cancelled = c.cancelled - d.n_cancelled,
        updated_at = now()
    FROM (
        SELECT campaign_uid, count(*) AS n_total,
               count(*) FILTER (WHERE status = 'pending') AS n_pending,
               count(*) FILTER (WHERE status = 'sending') AS n_sending,
               count(*) FILTER (WHERE status = 'unknown') AS n_unknown,
               count(*) FILTER (WHERE status = 'sent') AS n_sent,
               count(*) FILTER (WHERE status = 'delivered') AS n_delivered,
               count(*) FILTER (WHERE status = 'read') AS n_read,
               count(*) FILTER (WHERE status = 'failed') AS n_failed,
               count(*) FILTER (WHERE status = 'cancelled') AS n_cancelled
        FROM old_rows GROUP BY campaign_uid
    ) d
    WHERE c.campaign_uid = d.campaign_uid;
    RETURN NULL;
END $$;
CREATE TRIGGER campaign_messages_count_delete
    AFTER DELETE ON campaign_messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_delete();

-- Rate-limit windows per channel: fixed calendar windows (UTC minute, hour, day), one
-- row per (organization, channel, window), reserved under a row lock so any number of
-- sender pods together never exceed a cap.
CREATE TABLE channel_rate_windows (
    organization TEXT        NOT NULL,
    channel      TEXT        NOT NULL,
    window_kind  TEXT        NOT NULL CHECK (window_kind IN ('minute', 'hour', 'day')),
    window_start TIMESTAMPTZ NOT NULL,
    used         INTEGER     NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (organization, channel, window_kind)
);

-- Per-channel state shared by senders: the next free send slot (Graceful spacing) and
-- the instant until which the channel is paused (a spent day window, a stop-the-channel
-- error that needs a person).
CREATE TABLE channel_state (
    organization   TEXT        NOT NULL,
    channel        TEXT        NOT NULL,
    next_slot_at   TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    paused_until   TIMESTAMPTZ,
    pause_reason   TEXT,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (organization, channel)
);
