{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "disparo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name when it already contains the chart name. */}}
{{- define "disparo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "disparo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "disparo.labels" -}}
helm.sh/chart: {{ include "disparo.chart" . }}
app.kubernetes.io/name: {{ include "disparo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: disparo
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "controller"). */}}
{{- define "disparo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "disparo.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component. */}}
{{- define "disparo.componentLabels" -}}
{{ include "disparo.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image, by digest when one is pinned. */}}
{{- define "disparo.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}
{{- end }}

{{- define "disparo.controller.fullname" -}}
{{- printf "%s-controller" (include "disparo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "disparo.webhook.fullname" -}}
{{- printf "%s-webhook" (include "disparo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "disparo.postgres.fullname" -}}
{{- printf "%s-postgres" (include "disparo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "disparo.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "disparo.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "disparo.webhook.serviceAccountName" -}}
{{- if .Values.webhook.serviceAccount.create }}
{{- default (include "disparo.webhook.fullname" .) .Values.webhook.serviceAccount.name }}
{{- else }}
{{- required "webhook.serviceAccount.name is required when webhook.serviceAccount.create is false" .Values.webhook.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the Postgres URL (bundled or user-provided). */}}
{{- define "disparo.databaseSecretName" -}}
{{- if .Values.postgres.bundled.enabled }}
{{- include "disparo.postgres.fullname" . }}
{{- else }}
{{- required "postgres.existingSecret is required (a Secret with the Postgres URL), or set postgres.bundled.enabled=true" .Values.postgres.existingSecret }}
{{- end }}
{{- end }}

{{- define "disparo.databaseSecretKey" -}}
{{- if .Values.postgres.bundled.enabled }}url{{ else }}{{ .Values.postgres.secretKey }}{{ end }}
{{- end }}

{{/* How the admin connections reach Postgres: the bundled Postgres has no TLS (and
stays inside the cluster); otherwise postgres.tls.mode. */}}
{{- define "disparo.postgresTLSMode" -}}
{{- if .Values.postgres.bundled.enabled }}disable{{ else }}{{ .Values.postgres.tls.mode }}{{ end }}
{{- end }}

{{/* The Secret with the CA that signed Postgres's certificate, or "" when none is
mounted. A CA only means something to the modes that check the certificate. */}}
{{- define "disparo.postgresCASecret" -}}
{{- $tls := .Values.postgres.tls }}
{{- if and (not .Values.postgres.bundled.enabled) $tls.caSecret }}
{{- if not (has $tls.mode (list "verify-ca" "verify-full")) }}
{{- fail (printf "postgres.tls.caSecret is set but postgres.tls.mode is %q: only verify-ca and verify-full check the server's certificate against it" $tls.mode) }}
{{- end }}
{{- $tls.caSecret }}
{{- end }}
{{- end }}

{{/* Where the CA is mounted (PGSSLROOTCERT). */}}
{{- define "disparo.postgresCAPath" -}}/etc/disparo/postgres-ca/ca.crt{{- end }}

{{/* DATABASE_URL from the Postgres Secret, and TLS as the binary's Postgres driver
reads it from the environment (PGSSLMODE, PGSSLROOTCERT). An sslmode or sslrootcert
in the URL itself wins over these. */}}
{{- define "disparo.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "disparo.databaseSecretName" . }}
      key: {{ include "disparo.databaseSecretKey" . }}
- name: PGSSLMODE
  value: {{ include "disparo.postgresTLSMode" . | quote }}
{{- if include "disparo.postgresCASecret" . }}
- name: PGSSLROOTCERT
  value: {{ include "disparo.postgresCAPath" . }}
{{- end }}
{{- end }}

{{/* The CA's volume mount (none without a CA). */}}
{{- define "disparo.postgresCAVolumeMount" -}}
{{- if include "disparo.postgresCASecret" . }}
- name: postgres-ca
  mountPath: {{ include "disparo.postgresCAPath" . | dir }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The CA's volume: only its one key, as ca.crt (none without a CA). */}}
{{- define "disparo.postgresCAVolume" -}}
{{- with include "disparo.postgresCASecret" . }}
- name: postgres-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
    items:
      - key: {{ $.Values.postgres.tls.caKey }}
        path: {{ include "disparo.postgresCAPath" $ | base }}
{{- end }}
{{- end }}

{{/* Soft anti-affinity spreading a component's replicas across nodes. */}}
{{- define "disparo.defaultAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "disparo.selectorLabels" . | nindent 12 }}
{{- end }}
