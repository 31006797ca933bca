-- Meta's per-user marketing limit (131049, "not delivered to maintain healthy ecosystem
-- engagement") is not a failure of the message: Meta declined it for now, and advises
-- trying again after growing delays (docs/providers.md, "Account health signals"). The
-- webhook puts such a message back to `pending`, due 24 h, 48 h, then 96 h later, and
-- fails it only after three requeues (`campaign_messages.marketing_requeues`, 0007).
--
-- The 131049 mostly comes asynchronously, as a `failed` status of a message that is
-- already `sent` (or `unknown`, when the sender did not learn its outcome), and the
-- forward-only rule has no way back from those. One narrow way back is added here, not
-- a general `sent -> pending`: the move must count one more marketing requeue and drop
-- the provider id (the attempt it named is over; its late receipts must not match the
-- next attempt). Nothing else may move a message backwards.

CREATE FUNCTION message_requeue_allowed(old message_status, new message_status, old_requeues SMALLINT,
                                        new_requeues SMALLINT, new_provider_id TEXT)
RETURNS BOOLEAN LANGUAGE SQL IMMUTABLE PARALLEL SAFE AS $$
    SELECT old IN ('sent', 'unknown') AND new = 'pending' AND new_requeues = old_requeues + 1
           AND new_provider_id IS NULL
$$;

CREATE OR REPLACE FUNCTION campaign_messages_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status AND NOT message_transition_allowed(OLD.status, NEW.status)
       AND NOT message_requeue_allowed(OLD.status, NEW.status, OLD.marketing_requeues, NEW.marketing_requeues,
                                       NEW.provider_message_id) THEN
        RAISE EXCEPTION 'message % cannot move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.campaign_uid <> OLD.campaign_uid OR NEW.contact_id <> OLD.contact_id OR NEW.organization <> OLD.organization THEN
        RAISE EXCEPTION 'message % cannot change campaign, contact or organization', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER campaign_messages_forward_only ON campaign_messages;
CREATE TRIGGER campaign_messages_forward_only
    BEFORE UPDATE ON campaign_messages
    FOR EACH ROW
    WHEN (NEW.status <> OLD.status AND NOT message_transition_allowed(OLD.status, NEW.status)
              AND NOT message_requeue_allowed(OLD.status, NEW.status, OLD.marketing_requeues, NEW.marketing_requeues,
                                              NEW.provider_message_id)
          OR NEW.campaign_uid <> OLD.campaign_uid OR NEW.contact_id <> OLD.contact_id
          OR NEW.organization <> OLD.organization)
    EXECUTE FUNCTION campaign_messages_forward_only();

-- The counters with the requeue. Status counts need nothing new (`sent` down, `pending`
-- up, like any move). What does: a message counted as having reached `sent` on its
-- first attempt (or after a retry) that is put back is no longer a success, so it
-- leaves that count (its next success counts again); and a requeue from `sent` or
-- `unknown` is a scheduled retry like one from `sending`. Otherwise as in 0005.
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
            count(*) FILTER (WHERE old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts <= 1)
              - count(*) FILTER (WHERE old_status = 'sent' AND new_status = 'pending' AND attempts <= 1) AS d_first,
            count(*) FILTER (WHERE old_status IN ('sending', 'unknown') AND new_status IN ('sent', 'delivered', 'read') AND attempts > 1)
              - count(*) FILTER (WHERE old_status = 'sent' AND new_status = 'pending' AND attempts > 1) AS d_retried,
            count(*) FILTER (WHERE old_status IN ('sending', 'sent', 'unknown') AND new_status = 'pending') AS d_retries,
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
-- CREATE OR REPLACE resets a function's attributes to those it states: 0006's are set again.
ALTER FUNCTION campaign_messages_count_update() SECURITY DEFINER SET search_path = public;

-- A kept receipt (0004) keeps what the status said about pricing, so a status that came
-- before its message's provider id was recorded does not lose it.
ALTER TABLE unmatched_receipts
    ADD COLUMN pricing_category TEXT,
    ADD COLUMN pricing_type     TEXT;
