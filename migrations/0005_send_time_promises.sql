-- no-transaction
--
-- Promises kept at send time, whatever was frozen before:
--   * a contact who opted out after the audience was frozen receives nothing: the claim
--     turns their message into `skipped` (terminal, never attempted) instead of sending it;
--   * a cancelled campaign sends nothing more: the campaign row carries the instant it was
--     cancelled, the claim takes nothing from it, and an attempt that ends in a retry or a
--     requeue ends as `cancelled` instead.
--
-- A new enum value cannot be used in the transaction that adds it, and sqlx runs a
-- migration in one transaction, so this file opts out of that transaction (first line):
-- the value is added and committed on its own, then everything else runs as one implicit
-- transaction (one simple-query string after the COMMIT), all or nothing. Every step is
-- idempotent, so re-running the file after a failure is safe.

ALTER TYPE message_status ADD VALUE IF NOT EXISTS 'skipped' AFTER 'cancelled';
COMMIT;

-- When the campaign was cancelled (NULL: not cancelled). Set once, never cleared.
ALTER TABLE campaigns ADD COLUMN IF NOT EXISTS cancelled_at TIMESTAMPTZ;

ALTER TABLE campaign_counters ADD COLUMN IF NOT EXISTS skipped BIGINT NOT NULL DEFAULT 0;

-- The forward-only rule with the two new moves:
--   pending -> skipped    the contact opted out before the message was attempted;
--   sending -> cancelled  the attempt provably did not send it (the provider answered
--                         with a retryable error, or the sender gave it back unsent) and
--                         the campaign was cancelled meanwhile; like sending -> pending.
CREATE OR REPLACE FUNCTION message_transition_allowed(old message_status, new message_status)
RETURNS BOOLEAN LANGUAGE SQL IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE old
        WHEN 'pending'   THEN new IN ('sending', 'failed', 'cancelled', 'skipped')
        WHEN 'sending'   THEN new IN ('pending', 'unknown', 'sent', 'delivered', 'read', 'failed', 'cancelled')
        WHEN 'unknown'   THEN new IN ('sent', 'delivered', 'read', 'failed')
        WHEN 'sent'      THEN new IN ('delivered', 'read', 'failed')
        WHEN 'delivered' THEN new IN ('read')
        ELSE FALSE
    END
$$;

-- The counter triggers with the `skipped` column. An attempt that ends `cancelled`
-- counts its error like the retry it would otherwise have been.
CREATE OR REPLACE FUNCTION campaign_messages_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO campaign_counters AS c (campaign_uid, total, pending, sending, unknown, sent, delivered, read, failed, cancelled, skipped)
    SELECT campaign_uid, count(*),
           count(*) FILTER (WHERE status = 'pending'),
           count(*) FILTER (WHERE status = 'sending'),
           count(*) FILTER (WHERE status = 'unknown'),
           count(*) FILTER (WHERE status = 'sent'),
           count(*) FILTER (WHERE status = 'delivered'),
           count(*) FILTER (WHERE status = 'read'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled'),
           count(*) FILTER (WHERE status = 'skipped')
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
        skipped = c.skipped + EXCLUDED.skipped,
        updated_at = now();
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION campaign_messages_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH moved AS MATERIALIZED (
        SELECT n.campaign_uid, o.status AS old_status, n.status AS new_status, n.attempts,
               n.last_error_code AS new_code, o.last_error_code AS old_code
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status <> o.status OR n.last_error_code IS DISTINCT FROM o.last_error_code
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
            count(*) FILTER (WHERE new_status = 'skipped')   - count(*) FILTER (WHERE old_status = 'skipped')   AS d_skipped,
            count(*) FILTER (WHERE old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts <= 1) AS d_first,
            count(*) FILTER (WHERE old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts > 1) AS d_retried,
            count(*) FILTER (WHERE old_status = 'sending' AND new_status = 'pending') AS d_retries,
            bool_or(old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read')) AS any_sent
        FROM moved WHERE new_status <> old_status GROUP BY campaign_uid
    ), counted AS (
        UPDATE campaign_counters c SET
            pending = c.pending + d.d_pending,
            sending = c.sending + d.d_sending,
            unknown = c.unknown + d.d_unknown,
            sent = c.sent + d.d_sent,
            delivered = c.delivered + d.d_delivered,
            read = c.read + d.d_read,
            failed = c.failed + d.d_failed,
            cancelled = c.cancelled + d.d_cancelled,
            skipped = c.skipped + d.d_skipped,
            succeeded_first_attempt = c.succeeded_first_attempt + d.d_first,
            succeeded_after_retry = c.succeeded_after_retry + d.d_retried,
            retries_scheduled = c.retries_scheduled + d.d_retries,
            first_sent_at = CASE WHEN d.any_sent THEN coalesce(c.first_sent_at, now()) ELSE c.first_sent_at END,
            last_sent_at = CASE WHEN d.any_sent THEN now() ELSE c.last_sent_at END,
            updated_at = now()
        FROM deltas d
        WHERE c.campaign_uid = d.campaign_uid
        RETURNING 1
    )
    -- every newly recorded error (a failed attempt or a final failure) counts once
    INSERT INTO campaign_error_counts AS e (campaign_uid, code, count)
    SELECT campaign_uid, new_code, count(*)
    FROM moved
    WHERE new_code IS NOT NULL
      AND ((new_status IN ('pending', 'failed', 'unknown') OR new_status = 'cancelled' AND old_status = 'sending') AND old_status <> new_status
           OR new_status = 'failed' AND old_status = 'failed' AND new_code IS DISTINCT FROM old_code)
    GROUP BY campaign_uid, new_code
    ON CONFLICT (campaign_uid, code) DO UPDATE SET count = e.count + EXCLUDED.count;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION campaign_messages_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
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
        skipped = c.skipped - d.n_skipped,
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
               count(*) FILTER (WHERE status = 'cancelled') AS n_cancelled,
               count(*) FILTER (WHERE status = 'skipped') AS n_skipped
        FROM old_rows GROUP BY campaign_uid
    ) d
    WHERE c.campaign_uid = d.campaign_uid;
    RETURN NULL;
END $$;
