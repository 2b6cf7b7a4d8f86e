{{/* Names and labels shared by every template. */}}

{{- define "omnirelay-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omnirelay-node.fullname" -}}
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

{{- define "omnirelay-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omnirelay-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "omnirelay-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "omnirelay-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omnirelay
{{- end }}

{{- define "omnirelay-node.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "omnirelay-node.validate" -}}
{{- if and .Values.tls.clientCaSecret (not .Values.tls.existingSecret) }}
{{- fail "tls.clientCaSecret (mutual TLS) needs tls.existingSecret (server TLS)" }}
{{- end }}
{{- if eq .Values.replicator.kind "sqlite" }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicator.kind sqlite serves one replica only (one node per log file): set replicaCount to 1" }}
{{- end }}
{{- if and (hasKey .Values.config "hub") (.Values.config.hub | default dict).endpoints }}
{{- fail "replicator.kind sqlite cannot be used with config.hub.endpoints (the hub would be the replicator)" }}
{{- end }}
{{- end }}
{{- end }}
