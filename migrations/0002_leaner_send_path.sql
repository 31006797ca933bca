-- A leaner send path: every message is updated twice by its sender (claimed, then
-- recorded), so what each update costs is what a campaign costs.

-- The claim orders due messages by (next_attempt_at, id). Without id in the index,
-- Postgres read and sorted every pending message of the batch on each claim of one
-- block, so a claim cost grew with the batch. With it, a claim reads only its block.
DROP INDEX campaign_messages_due_idx;
CREATE INDEX campaign_messages_due_idx
    ON campaign_messages (campaign_uid, batch_index, next_attempt_at, id)
    WHERE status = 'pending';

-- The per-batch status index took a new entry on every update. Pending messages are
-- found through the due index; what else needs a batch's messages by status is a
-- sender starting up looking for messages a dead run left `sending`, so only those
-- are indexed.
DROP INDEX campaign_messages_batch_idx;
CREATE INDEX campaign_messages_in_flight_idx
    ON campaign_messages (campaign_uid, batch_index)
    WHERE status = 'sending';

-- The forward-only rule as a trigger condition: the condition is plain SQL evaluated
-- per row, and the PL/pgSQL function (which only raises the error) runs for violations
-- alone instead of for every updated row.
DROP TRIGGER campaign_messages_forward_only ON campaign_messages;
CREATE TRIGGER campaign_messages_forward_only
    BEFORE UPDATE ON campaign_messages
    FOR EACH ROW
    WHEN (NEW.status <> OLD.status AND NOT message_transition_allowed(OLD.status, NEW.status)
          OR NEW.campaign_uid <> OLD.campaign_uid OR NEW.contact_id <> OLD.contact_id
          OR NEW.organization <> OLD.organization)
    EXECUTE FUNCTION campaign_messages_forward_only();

-- The counters in one statement: the old and new rows are joined once (the error
-- counts used to join them a second time), and rows whose status and error did not
-- change are dropped before counting. This halved the trigger's share of a claim.
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
      AND (new_status IN ('pending', 'failed', 'unknown') AND old_status <> new_status
           OR new_status = 'failed' AND old_status = 'failed' AND new_code IS DISTINCT FROM old_code)
    GROUP BY campaign_uid, new_code
    ON CONFLICT (campaign_uid, code) DO UPDATE SET count = e.count + EXCLUDED.count;
    RETURN NULL;
END $$;
