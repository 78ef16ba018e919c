{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "caption-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of every resource: the release name, with the chart name unless the release name contains it. */}}
{{- define "caption-worker.fullname" -}}
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

{{- define "caption-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "caption-worker.labels" -}}
helm.sh/chart: {{ include "caption-worker.chart" . }}
{{ include "caption-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the worker pods; they never change after the first install. */}}
{{- define "caption-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "caption-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "caption-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "caption-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "caption-worker.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Directory where the Kafka TLS Secret is mounted. */}}
{{- define "caption-worker.kafkaTlsDir" -}}
/etc/caption-worker/kafka-tls
{{- end }}

{{/* librdkafka security.protocol implied by kafka.sasl.enabled and kafka.tls.enabled. */}}
{{- define "caption-worker.kafkaSecurityProtocol" -}}
{{- if and .Values.kafka.sasl.enabled .Values.kafka.tls.enabled }}SASL_SSL
{{- else if .Values.kafka.sasl.enabled }}SASL_PLAINTEXT
{{- else if .Values.kafka.tls.enabled }}SSL
{{- else }}PLAINTEXT
{{- end }}
{{- end }}

{{/*
librdkafka properties as a JSON object for CAPTION_KAFKA_OPTION: kafka.options, then the
security properties derived from kafka.sasl and kafka.tls, which win on a clash.
*/}}
{{- define "caption-worker.kafkaOptions" -}}
{{- $options := deepCopy .Values.kafka.options }}
{{- $_ := set $options "security.protocol" (include "caption-worker.kafkaSecurityProtocol" .) }}
{{- if .Values.kafka.sasl.enabled }}
{{- $_ := set $options "sasl.mechanism" .Values.kafka.sasl.mechanism }}
{{- end }}
{{- with .Values.kafka.tls }}
{{- if .enabled }}
{{- $dir := include "caption-worker.kafkaTlsDir" $ }}
{{- if .caKey }}
{{- $_ := set $options "ssl.ca.location" (printf "%s/%s" $dir .caKey) }}
{{- end }}
{{- if .certKey }}
{{- $_ := set $options "ssl.certificate.location" (printf "%s/%s" $dir .certKey) }}
{{- end }}
{{- if .keyKey }}
{{- $_ := set $options "ssl.key.location" (printf "%s/%s" $dir .keyKey) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key, $value := $options }}
{{- $_ := set $options $key (toString $value) }}
{{- end }}
{{- toJson $options }}
{{- end }}

{{/*
A settings value as the string the worker parses. Numbers arrive from YAML as float64,
which toString would print in exponent form (2.62144e+07), so whole numbers print as integers.
*/}}
{{- define "caption-worker.settingValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- printf "%d" (int64 .) }}
{{- else if or (kindIs "slice" .) (kindIs "map" .) }}
{{- toJson . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Seconds that the worker's shutdown steps after the drain can take, from the timeouts in
worker/stream.py: producer flush 15, final commit 15, consumer close 15 and engine close 15.
With exactly-once delivery the final commit is a transaction, whose offsets and commit
calls have 30 s each, so the steps can take 45 s more.
*/}}
{{- define "caption-worker.shutdownStepsSeconds" -}}
{{- if eq .Values.config.delivery "exactly-once" }}105{{ else }}60{{ end }}
{{- end }}

{{/* Seconds of terminationGracePeriodSeconds: set, or derived from the drain timeout and the later shutdown steps. */}}
{{- define "caption-worker.terminationGracePeriodSeconds" -}}
{{- $drain := .Values.config.drainTimeoutSeconds | default 60 | float64 }}
{{- $steps := include "caption-worker.shutdownStepsSeconds" . | int64 }}
{{- $shutdown := addf $drain $steps }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (ceil $drain | int64) $steps (.Values.terminationGraceMarginSeconds | int64) }}
{{- else if le (.Values.terminationGracePeriodSeconds | float64) $shutdown }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than config.drainTimeoutSeconds (%v) plus %d s for flushing, committing and closing (%v in all), or the pod can be killed before it commits; leave it empty to derive it" .Values.terminationGracePeriodSeconds $drain $steps $shutdown) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds | int64 }}
{{- end }}
{{- end }}

{{/* Target lag per replica for KEDA: autoscaling.keda.lagThreshold, else config.maxInFlight. */}}
{{- define "caption-worker.lagThreshold" -}}
{{- $threshold := .Values.autoscaling.keda.lagThreshold }}
{{- if kindIs "invalid" $threshold }}
{{- $threshold = .Values.config.maxInFlight | default 64 }}
{{- end }}
{{- $threshold | int64 }}
{{- end }}

{{/* Whether KEDA or the HPA sets the replica count. */}}
{{- define "caption-worker.autoscaled" -}}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}true{{- end }}
{{- end }}

{{/* Fails the render on value combinations that cannot work, naming the values to change. */}}
{{- define "caption-worker.validate" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are both true: enable at most one, because KEDA creates its own HPA and two HPAs would fight over the replica count" }}
{{- end }}
{{- if and .Values.kafka.sasl.enabled (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.enabled is true but kafka.sasl.existingSecret is empty: name the Secret that contains the SASL username and password" }}
{{- end }}
{{- if and .Values.kafka.tls.enabled (not .Values.kafka.tls.existingSecret) }}
{{- fail "kafka.tls.enabled is true but kafka.tls.existingSecret is empty: name the Secret that contains the CA certificate" }}
{{- end }}
{{- if and .Values.kafka.tls.enabled (ne (empty .Values.kafka.tls.certKey) (empty .Values.kafka.tls.keyKey)) }}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey must be set together for mutual TLS" }}
{{- end }}
{{- if not (has .Values.model.source (list "image" "pvc" "s3")) }}
{{- fail (printf "model.source %q is invalid: use image, pvc or s3" .Values.model.source) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source is pvc but model.pvc.claimName is empty: name the PersistentVolumeClaim that contains the model" }}
{{- end }}
{{- if and (eq .Values.model.source "s3") (not (hasPrefix "s3://" .Values.model.s3.uri)) }}
{{- fail (printf "model.source is s3 but model.s3.uri %q is not an s3://bucket/prefix URI" .Values.model.s3.uri) }}
{{- end }}
{{- $_ := include "caption-worker.terminationGracePeriodSeconds" . }}
{{- end }}

{{/* env items with static S3 credentials from s3.credentials.existingSecret; empty without one. */}}
{{- define "caption-worker.s3CredentialsEnvItems" -}}
{{- with .Values.s3.credentials }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* A container's env field with the S3 credentials, or nothing without a Secret. */}}
{{- define "caption-worker.s3CredentialsEnv" -}}
{{- with include "caption-worker.s3CredentialsEnvItems" . | trim }}
env:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}

{{/* env items of the worker container: SASL credentials, S3 credentials and extraEnv. */}}
{{- define "caption-worker.workerEnvItems" -}}
{{- with .Values.kafka.sasl }}
{{- if .enabled }}
- name: CAPTION_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .usernameKey }}
- name: CAPTION_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- include "caption-worker.s3CredentialsEnvItems" . | nindent 0 }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
