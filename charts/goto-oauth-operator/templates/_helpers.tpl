{{/* Chart name, 63 characters at most (a DNS label). */}}
{{- define "goto-oauth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless the release name already has it. */}}
{{- define "goto-oauth-operator.fullname" -}}
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

{{- define "goto-oauth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment selector is immutable). */}}
{{- define "goto-oauth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "goto-oauth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every resource. */}}
{{- define "goto-oauth-operator.labels" -}}
helm.sh/chart: {{ include "goto-oauth-operator.chart" . }}
app.kubernetes.io/name: {{ include "goto-oauth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: goto-oauth-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "goto-oauth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "goto-oauth-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "goto-oauth-operator.leaseName" -}}
{{- default (include "goto-oauth-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "goto-oauth-operator.stateKeySecretName" -}}
{{- default (printf "%s-state-key" (include "goto-oauth-operator.fullname" .)) .Values.stateKeySecretName }}
{{- end }}

{{/* The public URL, validated: required, and https (http only on localhost for development). */}}
{{- define "goto-oauth-operator.publicUrl" -}}
{{- $url := required "publicUrl is required: the external https base URL of the authorize/callback endpoint (e.g. --set publicUrl=https://goto-oauth.example.com)" .Values.publicUrl }}
{{- $u := urlParse $url }}
{{- if not (or (eq $u.scheme "https") (and (eq $u.scheme "http") (has (regexReplaceAll ":[0-9]+$" $u.host "") (list "localhost" "127.0.0.1")))) }}
{{- fail (printf "publicUrl %q must use https (http only for localhost)" $url) }}
{{- end }}
{{- $url }}
{{- end }}

{{/* The rules the operator needs wherever it watches GoToOAuthClients. */}}
{{- define "goto-oauth-operator.watchRules" -}}
# The resource it reconciles; patch/update for finalizers and metadata, never create/delete.
- apiGroups: ["goto-oauth.dev"]
  resources: ["gotooauthclients"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["goto-oauth.dev"]
  resources: ["gotooauthclients/status"]
  verbs: ["get", "patch", "update"]
# Token Secrets it owns and the client-secret Secrets it reads.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# Events on GoToOAuthClients (kube-rs Recorder writes events.k8s.io/v1).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rolloutRestart.enabled }}
# Opt-in: rollout restarts of spec.rolloutRestartTargets (a merge patch of the pod template).
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["patch"]
{{- end }}
{{- end }}
