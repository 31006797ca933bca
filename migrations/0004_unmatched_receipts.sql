-- Receipts are never lost.
--
-- A provider may report a message's status before its sender has recorded the provider
-- id the provider gave it: the webhook races the sender's write after every block, and
-- a send that timed out leaves its message `unknown` with no id at all. Such a receipt
-- used to be acknowledged and dropped. Now it is kept here, and the webhook service
-- matches kept receipts again every few seconds (applying them through the same rules
-- as a receipt that finds its message at once) and drops those older than a day.
--
-- Why a sweep by the webhook service and not a trigger on campaign_messages: the rules
-- for applying receipts (forward-only moves, their order within a batch, history
-- entries, a late failure only noted) live in one place, the webhook's store code, and
-- a trigger would have to repeat them in PL/pgSQL; and the sender's statement that
-- records provider ids, the busiest statement of a campaign, keeps its cost and its
-- locks as they are. The price is a few seconds before a kept receipt shows.

CREATE TABLE unmatched_receipts (
    -- The key: a receipt is kept once however often the provider retries it.
    organization        TEXT        NOT NULL,
    provider_message_id TEXT        NOT NULL,
    provider            TEXT        NOT NULL CHECK (provider IN ('meta', 'evolution')),
    channel             TEXT        NOT NULL,
    status              TEXT        NOT NULL CHECK (status IN ('sent', 'delivered', 'read', 'failed')),
    -- What applying it needs.
    at                  TIMESTAMPTZ NOT NULL,           -- when the provider says it happened
    error_code          TEXT,
    error_title         TEXT,
    message_id          BIGINT,                         -- our id, when the provider echoed it
    recipient           TEXT,                           -- the recipient's WhatsApp id (digits)
    opts_out            BOOLEAN     NOT NULL DEFAULT FALSE, -- the failure says the recipient opted out
    received_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (organization, provider_message_id, provider, channel, status)
);
CREATE INDEX unmatched_receipts_received_idx ON unmatched_receipts (received_at);

-- An Evolution receipt never echoes our id, so an `unknown` message (its provider id
-- never recorded) is found through its contact: the only unknown message without a
-- provider id to that contact on the receipt's channel. Unknown messages are few, so
-- the index is small and costs the send path nothing.
CREATE INDEX campaign_messages_unknown_contact_idx
    ON campaign_messages (contact_id)
    WHERE status = 'unknown' AND provider_message_id IS NULL;
