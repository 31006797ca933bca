-- Tenancy enforced by Postgres itself.
--
-- An organization is a Kubernetes namespace, identified by the namespace's UID (so a
-- namespace deleted and re-created under the same name is a new, empty organization).
-- Each organization has its own login role; the controller creates it, with a random
-- password, the first time the namespace runs a campaign, and hands the namespace a
-- Secret with a URL for that role only. Row-level security makes every table that
-- holds an organization's rows show and change that organization's rows alone to such
-- a role, whatever SQL it runs. The admin role (the migrations' owner, used by the
-- controller and the webhook service in the release namespace) owns the tables and is
-- not subject to these policies.

CREATE TABLE organizations (
    -- The namespace's UID: the `organization` of every row of the organization.
    id         TEXT        PRIMARY KEY,
    -- The namespace's name when the organization was provisioned, for people.
    namespace  TEXT        NOT NULL,
    -- Its login role.
    role_name  NAME        NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX organizations_namespace_idx ON organizations (namespace, created_at DESC);

-- The group every organization role belongs to: grants and policies name it once.
-- Roles are shared by every database of a Postgres cluster, so it may exist already.
DO $$
BEGIN
    CREATE ROLE disparo_tenant NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;

-- The organization whose role runs the statement (NULL for any other role). Policies
-- call it as `(SELECT current_organization())`, which Postgres evaluates once per
-- statement instead of once per row.
CREATE FUNCTION current_organization() RETURNS TEXT LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT id FROM organizations WHERE role_name = current_user
$$;

GRANT USAGE ON SCHEMA public TO disparo_tenant;
GRANT EXECUTE ON FUNCTION current_organization() TO disparo_tenant;
GRANT SELECT ON organizations TO disparo_tenant;
GRANT SELECT, INSERT, UPDATE, DELETE ON contacts TO disparo_tenant;
GRANT USAGE ON SEQUENCE contacts_id_seq TO disparo_tenant;
GRANT SELECT ON campaigns TO disparo_tenant;
-- A sender stops its own campaign when the provider refuses its message.
GRANT UPDATE (stop_code, stop_message, stopped_at) ON campaigns TO disparo_tenant;
GRANT SELECT, UPDATE ON campaign_messages TO disparo_tenant;
GRANT SELECT ON campaign_counters, campaign_error_counts TO disparo_tenant;
GRANT SELECT, INSERT, UPDATE ON channel_rate_windows, channel_state TO disparo_tenant;

ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_organization ON organizations TO disparo_tenant USING (role_name = current_user);

ALTER TABLE contacts ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON contacts TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

ALTER TABLE campaigns ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON campaigns TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

ALTER TABLE campaign_messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON campaign_messages TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

ALTER TABLE campaign_counters ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON campaign_counters TO disparo_tenant
    USING (campaign_uid IN (SELECT uid FROM campaigns));

ALTER TABLE campaign_error_counts ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON campaign_error_counts TO disparo_tenant
    USING (campaign_uid IN (SELECT uid FROM campaigns));

ALTER TABLE channel_rate_windows ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON channel_rate_windows TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

ALTER TABLE channel_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON channel_state TO disparo_tenant
    USING (organization = (SELECT current_organization())) WITH CHECK (organization = (SELECT current_organization()));

-- Nothing of another tenant's receipts is readable; only the admin writes them.
ALTER TABLE unmatched_receipts ENABLE ROW LEVEL SECURITY;

-- The counters are maintained by triggers, never written by a tenant directly: the
-- trigger functions run as their owner (the admin), so a tenant's status change still
-- counts while the counter tables stay read-only to it.
ALTER FUNCTION campaign_messages_count_insert() SECURITY DEFINER SET search_path = public;
ALTER FUNCTION campaign_messages_count_update() SECURITY DEFINER SET search_path = public;
ALTER FUNCTION campaign_messages_count_delete() SECURITY DEFINER SET search_path = public;
