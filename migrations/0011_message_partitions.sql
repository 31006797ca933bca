-- One partition of campaign_messages per campaign (docs/architecture.md, "Partitions").
--
-- Why: a finished campaign's rows are dropped with its partition (DETACH + DROP, one
-- catalog change) instead of deleted row by row, and what the sender's claim reads is
-- its own campaign's partition, whatever other campaigns hold. Every statement on
-- campaign_messages names its campaign (`campaign_uid = $1`), so Postgres prunes to one
-- partition when it plans; a statement that does not is planned and locked against
-- every partition, and costs grow with their number.
--
-- There is no DEFAULT partition: a row of a campaign without a partition is refused,
-- rather than landing in a table every query would have to scan. A campaign's partition
-- is created when its audience is frozen (campaign_messages_partition below).
--
-- This file moves the existing rows in the migration's transaction: the new table is
-- created, one partition per campaign that has messages, the rows copied, the old table
-- dropped and the new one takes its name; triggers, row-level security and grants are
-- created again on it. The counter triggers are created after the copy, so the copy
-- does not count the rows a second time.

ALTER TABLE campaign_messages RENAME TO campaign_messages_unpartitioned;
-- Its indexes' names are the new table's: the copy needs none of them.
DROP INDEX campaign_messages_due_idx, campaign_messages_in_flight_idx, campaign_messages_provider_id_idx,
    campaign_messages_unknown_contact_idx, campaign_messages_marketing_held_idx;
ALTER TABLE campaign_messages_unpartitioned RENAME CONSTRAINT campaign_messages_pkey TO campaign_messages_unpartitioned_pkey;
ALTER TABLE campaign_messages_unpartitioned
    RENAME CONSTRAINT campaign_messages_campaign_uid_contact_id_key TO campaign_messages_unpartitioned_key;
ALTER SEQUENCE campaign_messages_id_seq OWNED BY NONE;

-- The same columns. Ids still come from one sequence shared by every campaign, so an
-- id names one message; the primary key must include the partition key.
CREATE TABLE campaign_messages (
    id                  BIGINT         NOT NULL DEFAULT nextval('campaign_messages_id_seq'),
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
    pricing_category    TEXT,
    pricing_type        TEXT,
    marketing_requeues  SMALLINT       NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_uid, id),
    UNIQUE (campaign_uid, contact_id)
) PARTITION BY LIST (campaign_uid);
ALTER SEQUENCE campaign_messages_id_seq OWNED BY campaign_messages.id;

-- Within a partition the campaign is one value, so the indexes leave it out.
CREATE INDEX campaign_messages_due_idx
    ON campaign_messages (batch_index, next_attempt_at, id)
    WHERE status = 'pending';
CREATE INDEX campaign_messages_in_flight_idx
    ON campaign_messages (batch_index)
    WHERE status = 'sending';
CREATE INDEX campaign_messages_provider_id_idx
    ON campaign_messages (organization, provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX campaign_messages_unknown_contact_idx
    ON campaign_messages (contact_id)
    WHERE status = 'unknown' AND provider_message_id IS NULL;
CREATE INDEX campaign_messages_marketing_held_idx ON campaign_messages (batch_index)
    WHERE marketing_requeues > 0 AND status = 'pending';

-- Creates (once) the partition of a campaign, empty, and returns it. Run by the
-- controller in a short transaction of its own before the audience is frozen: attaching
-- clones the foreign keys, which briefly locks campaigns and contacts against writes,
-- and that lock must not last as long as the freeze. Attaching locks campaign_messages
-- only against other attaches and detaches (SHARE UPDATE EXCLUSIVE): senders go on.
--
-- A partition is reached through campaign_messages only: row-level security is enabled
-- on it with no policy, so a role that is not its owner reads nothing through it
-- directly even if it were granted access; through the parent, the parent's policies
-- apply.
CREATE FUNCTION campaign_messages_partition(campaign UUID) RETURNS regclass
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    part TEXT := 'campaign_messages_' || replace(campaign::text, '-', '');
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format('CREATE TABLE %I (LIKE campaign_messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', part);
        EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', part);
        EXECUTE format('ALTER TABLE campaign_messages ATTACH PARTITION %I FOR VALUES IN (%L)', part, campaign);
    END IF;
    RETURN part::regclass;
END $$;
REVOKE ALL ON FUNCTION campaign_messages_partition(UUID) FROM PUBLIC;

-- Detaches and drops a campaign's partition (retention: Delete). Both take an ACCESS
-- EXCLUSIVE lock on campaign_messages for an instant; the caller bounds the wait with
-- lock_timeout. Returns whether there was one.
CREATE FUNCTION campaign_messages_drop_partition(campaign UUID) RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    part TEXT := 'campaign_messages_' || replace(campaign::text, '-', '');
BEGIN
    IF to_regclass(part) IS NULL THEN
        RETURN FALSE;
    END IF;
    EXECUTE format('ALTER TABLE campaign_messages DETACH PARTITION %I', part);
    EXECUTE format('DROP TABLE %I', part);
    RETURN TRUE;
END $$;
REVOKE ALL ON FUNCTION campaign_messages_drop_partition(UUID) FROM PUBLIC;

-- The rows, campaign by campaign (each campaign's rows go straight to its partition).
DO $$
DECLARE
    c UUID;
BEGIN
    FOR c IN SELECT DISTINCT campaign_uid FROM campaign_messages_unpartitioned LOOP
        PERFORM campaign_messages_partition(c);
    END LOOP;
END $$;
INSERT INTO campaign_messages (id, campaign_uid, organization, contact_id, batch_index, status, attempts,
                               next_attempt_at, provider_message_id, last_error_code, last_error_message,
                               status_history, created_at, updated_at, pricing_category, pricing_type,
                               marketing_requeues)
SELECT id, campaign_uid, organization, contact_id, batch_index, status, attempts,
       next_attempt_at, provider_message_id, last_error_code, last_error_message,
       status_history, created_at, updated_at, pricing_category, pricing_type,
       marketing_requeues
FROM campaign_messages_unpartitioned;
DROP TABLE campaign_messages_unpartitioned;

-- The forward-only rule (as in 0008), cloned to every partition by Postgres.
CREATE TRIGGER campaign_messages_forward_only
    BEFORE UPDATE ON campaign_messages
    FOR EACH ROW
    WHEN (NEW.status <> OLD.status AND NOT message_transition_allowed(OLD.status, NEW.status)
              AND NOT message_requeue_allowed(OLD.status, NEW.status, OLD.marketing_requeues, NEW.marketing_requeues,
                                              NEW.provider_message_id)
          OR NEW.campaign_uid <> OLD.campaign_uid OR NEW.contact_id <> OLD.contact_id
          OR NEW.organization <> OLD.organization)
    EXECUTE FUNCTION campaign_messages_forward_only();

-- The counters (functions as in 0005 and 0008): statement triggers on the partitioned
-- table see the rows of every partition a statement touched.
CREATE TRIGGER campaign_messages_count_insert
    AFTER INSERT ON campaign_messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_insert();
CREATE TRIGGER campaign_messages_count_update
    AFTER UPDATE ON campaign_messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_update();
CREATE TRIGGER campaign_messages_count_delete
    AFTER DELETE ON campaign_messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_delete();

-- Tenancy as in 0006.
GRANT SELECT, UPDATE ON campaign_messages TO disparo_tenant;
ALTER TABLE campaign_messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON campaign_messages TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

-- Receipts name their campaigns (docs/architecture.md, "Partitions"). A receipt whose
-- campaign is not echoed is looked up in the campaigns of its channel that may still
-- receive receipts; this index finds a channel's campaigns without reading every
-- campaign of the organization.
CREATE INDEX campaigns_channel_idx ON campaigns (organization, channel);
-- The campaign a kept receipt named (Meta's `biz_opaque_callback_data`), so the sweep
-- looks it up in that campaign alone.
ALTER TABLE unmatched_receipts ADD COLUMN campaign_uid UUID;
