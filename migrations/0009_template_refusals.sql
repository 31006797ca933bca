-- A sender that meets Meta's refusal of a paused or disabled template (132015, 132016)
-- records it as the template's status, as the `message_template_status_update`
-- webhook would: the campaigns using the template are then held, and Meta's
-- `APPROVED` lifts the hold by itself (docs/architecture.md, "What holds sending back").
GRANT INSERT, UPDATE (status, reason, updated_at) ON template_state TO disparo_tenant;
