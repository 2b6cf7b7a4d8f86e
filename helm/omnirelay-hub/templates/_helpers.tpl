{{/* Names and labels shared by every template. */}}

{{- define "omnirelay-hub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omnirelay-hub.fullname" -}}
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

{{- define "omnirelay-hub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omnirelay-hub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "omnirelay-hub.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "omnirelay-hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omnirelay
{{- end }}

{{- define "omnirelay-hub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "omnirelay-hub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "omnirelay-hub.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Refuses combinations the hub would refuse at start, at render time. */}}
{{- define "omnirelay-hub.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.database.existingSecret) }}
{{- fail "replicaCount > 1 needs PostgreSQL: set database.existingSecret (the embedded SQLite store serves one replica only)" }}
{{- end }}
{{- if and (eq .Values.database.tls "verify-full") (not .Values.database.caSecret) }}
{{- fail "database.tls verify-full needs database.caSecret (the CA that signed PostgreSQL's certificate)" }}
{{- end }}
{{- if and .Values.database.caSecret (ne .Values.database.tls "verify-full") }}
{{- fail "database.caSecret is only used with database.tls verify-full" }}
{{- end }}
{{- if and .Values.tls.clientCaSecret (not .Values.tls.existingSecret) }}
{{- fail "tls.clientCaSecret (mutual TLS) needs tls.existingSecret (server TLS)" }}
{{- end }}
{{- if ge (int .Values.database.committers) (int .Values.database.poolSize) }}
{{- fail "database.committers must be fewer than database.poolSize" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add 10 (int .Values.preStopSleepSeconds) | int) }}
{{- fail "terminationGracePeriodSeconds must exceed preStopSleepSeconds + 10 (the hub's own shutdown grace is 10 s below it)" }}
{{- end }}
{{- end }}

{{/* Settings of the database, shared by the hub and the migration Job. */}}
{{- define "omnirelay-hub.databaseEnv" -}}
{{- if .Values.database.existingSecret }}
- name: OMNIRELAY_HUB_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
- name: OMNIRELAY_HUB_DATABASE_TLS
  value: {{ .Values.database.tls | quote }}
{{- if .Values.database.caSecret }}
- name: OMNIRELAY_HUB_DATABASE_CA_FILE
  value: /etc/omnirelay/database-ca/{{ .Values.database.caKey }}
{{- end }}
- name: OMNIRELAY_HUB_DATABASE_POOL_SIZE
  value: {{ .Values.database.poolSize | quote }}
- name: OMNIRELAY_HUB_COMMITTERS
  value: {{ .Values.database.committers | quote }}
{{- end }}
- name: OMNIRELAY_HUB_LOG
  value: {{ .Values.log.filter | quote }}
- name: OMNIRELAY_HUB_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
{{- end }}
