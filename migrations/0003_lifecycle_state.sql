-- Lifecycle state as types, not sentences.
--
-- A channel pause used to be `paused_until` plus a free-text reason; the controller told
-- a spent window from a provider refusal by reading the sentence, and a refusal was a
-- pause ten years long that nothing cleared. Now the kind is an enum:
--   window_spent      a cap of a Hard channel is spent until `paused_until`;
--   provider_refused  the provider refused the channel's credentials, permissions or
--                     account; no end instant: it holds until a person resumes or the
--                     channel's credentials change (`stopped_credentials_version`).
CREATE TYPE channel_pause_kind AS ENUM ('window_spent', 'provider_refused');

ALTER TABLE channel_state
    ADD COLUMN pause_kind channel_pause_kind,
    ADD COLUMN pause_code TEXT,
    -- The version of the channel's credentials as the controller last saw them (the
    -- referenced Secrets' resourceVersions), and as they were when the provider refused
    -- them: when the two differ, a person changed the credentials and the stop lifts.
    ADD COLUMN credentials_version TEXT,
    ADD COLUMN stopped_credentials_version TEXT,
    -- The channel's effective caps as the controller last wrote them. Senders read them
    -- every second, so an edited Channel reaches senders that are already running.
    ADD COLUMN limits JSONB;

UPDATE channel_state SET
    pause_kind = CASE WHEN pause_reason LIKE '%day window%' THEN 'window_spent'::channel_pause_kind
                      ELSE 'provider_refused'::channel_pause_kind END,
    paused_until = CASE WHEN pause_reason LIKE '%day window%' THEN paused_until END
WHERE paused_until IS NOT NULL;

ALTER TABLE channel_state ADD CONSTRAINT channel_state_pause_shape CHECK (
    pause_kind IS NULL
    OR pause_kind = 'window_spent' AND paused_until IS NOT NULL
    OR pause_kind = 'provider_refused' AND paused_until IS NULL
);

-- A campaign whose message the provider refuses for reasons of the message itself (a
-- paused or disabled template, a template on a provider without templates) is stopped
-- alone; its channel goes on serving other campaigns. Cleared by a person's resume or
-- when the campaign's send configuration changes.
ALTER TABLE campaigns
    ADD COLUMN stop_code TEXT,
    ADD COLUMN stop_message TEXT,
    ADD COLUMN stopped_at TIMESTAMPTZ;
