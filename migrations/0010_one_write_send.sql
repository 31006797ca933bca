-- One write per message on the send path (docs/architecture.md, "One write per message").
--
-- A sender used to mark each claimed message `sending` (one write), call the provider,
-- then record the outcome (a second write). Now a block's claim writes one
-- `send_intents` row naming the messages it is about to send, in the transaction that
-- locks them (`FOR UPDATE SKIP LOCKED`), and the transaction that writes the outcomes
-- deletes it. A message therefore goes straight from `pending` to its outcome, and no
-- transaction is held across the provider calls.
--
-- No claim takes a message an intent names. An intent still there when its run is gone
-- means the block's calls may have been made: the next run of the batch turns its
-- messages that are still `pending` into `unknown`, never sending them again. The id is
-- the sender's: a claim whose commit answer was lost can delete its own intent.

CREATE TABLE send_intents (
    id            UUID        PRIMARY KEY,
    organization  TEXT        NOT NULL,
    campaign_uid  UUID        NOT NULL,
    batch_index   INT         NOT NULL,
    run_id        TEXT        NOT NULL,
    message_ids   BIGINT[]    NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX send_intents_batch_idx ON send_intents (campaign_uid, batch_index);

GRANT SELECT, INSERT, DELETE ON send_intents TO disparo_tenant;
ALTER TABLE send_intents ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON send_intents TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

-- The outcome of an attempt is now recorded from `pending` as well as from `sending`
-- (which stays for rows an older sender left). `pending -> pending` with one more
-- attempt is a retry.
CREATE OR REPLACE FUNCTION message_transition_allowed(old message_status, new message_status)
RETURNS BOOLEAN LANGUAGE SQL IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE old
        WHEN 'pending'   THEN new IN ('sending', 'unknown', 'sent', 'failed', 'cancelled', 'skipped')
        WHEN 'sending'   THEN new IN ('pending', 'unknown', 'sent', 'delivered', 'read', 'failed', 'cancelled')
        WHEN 'unknown'   THEN new IN ('sent', 'delivered', 'read', 'failed')
        WHEN 'sent'      THEN new IN ('delivered', 'read', 'failed')
        WHEN 'delivered' THEN new IN ('read')
        ELSE FALSE
    END
$$;

-- The counters with attempts recorded from `pending`. What was keyed on leaving
-- `sending` is now keyed on an attempt: a row whose `attempts` grew in the statement
-- (the one-write path spends the attempt with its outcome), one put back by Meta's
-- marketing limit (its `marketing_requeues` grew: the attempt was made, and given back),
-- or one leaving `sending` (the two-write path spent it when marking). A retry is then `pending -> pending` with
-- one more attempt, so rows count as moved when their attempts change too.
-- Otherwise as in 0008.
CREATE OR REPLACE FUNCTION campaign_messages_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH moved AS MATERIALIZED (
        SELECT n.campaign_uid, o.status AS old_status, n.status AS new_status, n.attempts,
               n.last_error_code AS new_code, o.last_error_code AS old_code,
               (o.status = 'sending' OR n.attempts > o.attempts OR n.marketing_requeues > o.marketing_requeues)
                   AND n.status <> 'sending' AS attempted
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status <> o.status OR n.last_error_code IS DISTINCT FROM o.last_error_code OR n.attempts <> o.attempts
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
            count(*) FILTER (WHERE (attempted OR old_status = 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts <= 1)
              - count(*) FILTER (WHERE old_status = 'sent' AND new_status = 'pending' AND attempts <= 1) AS d_first,
            count(*) FILTER (WHERE (attempted OR old_status = 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts > 1)
              - count(*) FILTER (WHERE old_status = 'sent' AND new_status = 'pending' AND attempts > 1) AS d_retried,
            count(*) FILTER (WHERE (attempted OR old_status IN ('sent', 'unknown')) AND new_status = 'pending') AS d_retries,
            bool_or((attempted OR old_status = 'unknown') AND new_status IN ('sent', 'delivered', 'read')) AS any_sent
        FROM moved WHERE new_status <> old_status OR attempted GROUP BY campaign_uid
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
      AND ((new_status IN ('pending', 'failed', 'unknown') AND (old_status <> new_status OR attempted))
           OR new_status = 'cancelled' AND attempted
           OR new_status = 'failed' AND old_status = 'failed' AND new_code IS DISTINCT FROM old_code)
    GROUP BY campaign_uid, new_code
    ON CONFLICT (campaign_uid, code) DO UPDATE SET count = e.count + EXCLUDED.count;
    RETURN NULL;
END $$;
-- CREATE OR REPLACE resets a function's attributes to those it states: 0006's are set again.
ALTER FUNCTION campaign_messages_count_update() SECURITY DEFINER SET search_path = public;
