{{/*
Names and labels.
*/}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "relay.fullname" -}}
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

{{- define "relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "relay.labels" -}}
helm.sh/chart: {{ include "relay.chart" . }}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode | kebabcase }}
{{- end }}

{{/*
Label the sidecar patch puts on the host pod, so the metrics Service finds it
without touching the host workload's own (immutable) selector labels.
*/}}
{{- define "relay.sidecarLabel" -}}
relay-sidecar: {{ include "relay.fullname" . }}
{{- end }}

{{- define "relay.podSelectorLabels" -}}
{{- if eq .Values.mode "standalone" }}
{{- include "relay.selectorLabels" . }}
{{- else }}
{{- include "relay.sidecarLabel" . }}
{{- end }}
{{- end }}

{{- define "relay.isSidecar" -}}
{{- if ne .Values.mode "standalone" }}true{{ end }}
{{- end }}

{{- define "relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "relay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "relay.rulesConfigMap" -}}
{{- default (printf "%s-rules" (include "relay.fullname" .)) .Values.rules.existingConfigMap }}
{{- end }}

{{/*
Cross-field checks that values.schema.json cannot express clearly; each fails the
render with a message that says what to change.
*/}}
{{- define "relay.validate" -}}
{{- $sidecar := include "relay.isSidecar" . }}
{{- if and $sidecar (not .Values.sidecar.target.name) }}
{{- fail (printf "mode=%s needs sidecar.target.name: the workload relay is added to" .Values.mode) }}
{{- end }}
{{- $lz := .Values.persistence.landingZone }}
{{- if eq $lz.type "podVolume" }}
{{- if not $sidecar }}
{{- fail "persistence.landingZone.type=podVolume is only for sidecar and nativeSidecar modes" }}
{{- end }}
{{- if not $lz.podVolume }}
{{- fail "persistence.landingZone.type=podVolume needs persistence.landingZone.podVolume: the host pod's volume name" }}
{{- end }}
{{- end }}
{{- range $key, $p := .Values.persistence }}
{{- if and (eq $p.type "existingClaim") (not $p.existingClaim) }}
{{- fail (printf "persistence.%s.type=existingClaim needs persistence.%s.existingClaim" $key $key) }}
{{- end }}
{{- end }}
{{- if and (not .Values.rules.existingConfigMap) (not (trim .Values.rules.inline)) }}
{{- fail "rules: set rules.inline or rules.existingConfigMap (relay will not start without rules)" }}
{{- end }}
{{- if not .Values.rules.existingConfigMap }}
{{- $parsed := fromYaml .Values.rules.inline }}
{{- if hasKey $parsed "Error" }}
{{- fail (printf "rules.inline is not valid YAML: %s" (get $parsed "Error")) }}
{{- end }}
{{- end }}
{{- if and (not $sidecar) (ge (int .Values.settings.shutdownTimeout) (int .Values.terminationGracePeriodSeconds)) }}
{{- fail "settings.shutdownTimeout must be below terminationGracePeriodSeconds, or Kubernetes kills relay mid-shutdown" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not (and .Values.metrics.enabled .Values.metrics.service.enabled)) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled and metrics.service.enabled" }}
{{- end }}
{{- end }}

{{- define "relay.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: metrics
  scheme: HTTP
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/*
The relay container, shared by the Deployment and the sidecar snippets.
*/}}
{{- define "relay.container" -}}
{{- $v := .Values }}
{{- $sidecar := include "relay.isSidecar" . -}}
name: relay
image: {{ include "relay.image" . | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args: ["run"]
{{- if eq $v.mode "nativeSidecar" }}
restartPolicy: Always
{{- end }}
env:
  - name: RELAY_RULES
    value: /etc/relay/rules
  - name: RELAY_JOURNAL
    value: {{ printf "%s/journal.sqlite3" (trimSuffix "/" $v.persistence.journal.mountPath) | quote }}
  - name: RELAY_LOG_FORMAT
    value: {{ $v.settings.logFormat | quote }}
  - name: RELAY_LOG_LEVEL
    value: {{ $v.settings.logLevel | quote }}
  - name: RELAY_METRICS_ADDR
    value: {{ ternary (printf "0.0.0.0:%d" (int $v.metrics.port)) "" $v.metrics.enabled | quote }}
  - name: RELAY_CONCURRENCY
    value: {{ $v.settings.concurrency | quote }}
  - name: RELAY_SHUTDOWN_TIMEOUT
    value: {{ $v.settings.shutdownTimeout | quote }}
  {{- if $v.secretFiles.existingSecret }}
  - name: RELAY_SECRETS_DIR
    value: {{ $v.secretFiles.mountPath | quote }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if $v.metrics.enabled }}
ports:
  - name: metrics
    containerPort: {{ $v.metrics.port }}
    protocol: TCP
{{- if $v.probes.startup.enabled }}
startupProbe:
  {{- include "relay.httpProbe" (dict "path" "/healthz" "probe" $v.probes.startup) | nindent 2 }}
{{- end }}
{{- if $v.probes.liveness.enabled }}
livenessProbe:
  {{- include "relay.httpProbe" (dict "path" "/healthz" "probe" $v.probes.liveness) | nindent 2 }}
{{- end }}
{{- if (ternary $v.sidecar.readinessProbe $v.probes.readiness.enabled (not (empty $sidecar))) }}
readinessProbe:
  {{- include "relay.httpProbe" (dict "path" "/readyz" "probe" $v.probes.readiness) | nindent 2 }}
{{- end }}
{{- end }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ $v.securityContext.runAsUser }}
  runAsGroup: {{ $v.securityContext.runAsGroup }}
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  privileged: false
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
volumeMounts:
  - name: relay-rules
    mountPath: /etc/relay/rules
    readOnly: true
  - name: {{ ternary $v.persistence.landingZone.podVolume "relay-landing" (eq $v.persistence.landingZone.type "podVolume") }}
    mountPath: {{ $v.persistence.landingZone.mountPath }}
    {{- with $v.persistence.landingZone.subPath }}
    subPath: {{ . }}
    {{- end }}
  - name: relay-journal
    mountPath: {{ $v.persistence.journal.mountPath }}
  - name: relay-tmp
    mountPath: /tmp
  {{- if $v.ssh.existingSecret }}
  - name: relay-ssh
    mountPath: {{ $v.ssh.mountPath }}
    readOnly: true
  {{- end }}
  {{- if $v.secretFiles.existingSecret }}
  - name: relay-secrets
    mountPath: {{ $v.secretFiles.mountPath }}
    readOnly: true
  {{- end }}
{{- end }}

{{- define "relay.volumeSource" -}}
{{- $p := .p }}
{{- if eq $p.type "pvc" -}}
persistentVolumeClaim:
  claimName: {{ .claim }}
{{- else if eq $p.type "existingClaim" -}}
persistentVolumeClaim:
  claimName: {{ $p.existingClaim }}
{{- else -}}
emptyDir:
  {{- if $p.sizeLimit }}
  sizeLimit: {{ $p.sizeLimit }}
  {{- else }} {}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The volumes the relay container mounts (the host pod's own landing-zone volume,
in podVolume mode, is not repeated here).
*/}}
{{- define "relay.volumes" -}}
{{- $v := .Values }}
{{- $full := include "relay.fullname" . -}}
- name: relay-rules
  configMap:
    name: {{ include "relay.rulesConfigMap" . }}
{{- if ne $v.persistence.landingZone.type "podVolume" }}
- name: relay-landing
  {{- include "relay.volumeSource" (dict "p" $v.persistence.landingZone "claim" (printf "%s-landing" $full)) | nindent 2 }}
{{- end }}
- name: relay-journal
  {{- include "relay.volumeSource" (dict "p" $v.persistence.journal "claim" (printf "%s-journal" $full)) | nindent 2 }}
- name: relay-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if $v.ssh.existingSecret }}
- name: relay-ssh
  secret:
    secretName: {{ $v.ssh.existingSecret }}
    defaultMode: {{ $v.ssh.defaultMode }}
{{- end }}
{{- if $v.secretFiles.existingSecret }}
- name: relay-secrets
  secret:
    secretName: {{ $v.secretFiles.existingSecret }}
    defaultMode: {{ $v.secretFiles.defaultMode }}
{{- end }}
{{- end }}

{{- define "relay.rulesChecksum" -}}
{{- if .Values.rules.existingConfigMap }}
{{- printf "existing:%s" .Values.rules.existingConfigMap | sha256sum }}
{{- else }}
{{- .Values.rules.inline | sha256sum }}
{{- end }}
{{- end }}
