{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name when it already contains the chart name.
*/}}
{{- define "splitserve.fullname" -}}
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

{{- define "splitserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "splitserve.labels" -}}
helm.sh/chart: {{ include "splitserve.chart" . }}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector of the server pods. The component label keeps the helm test pod out of
the Service's endpoints.
*/}}
{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "splitserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "splitserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The server image: the digest wins over the tag; the default tag is
<appVersion>-cuda for GPU pods and <appVersion>-cpu otherwise.
*/}}
{{- define "splitserve.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- printf "%s:%s" $img.repository (default (printf "%s-%s" .Chart.AppVersion $variant) $img.tag) }}
{{- end }}
{{- end }}

{{/*
Whole seconds in a splitserve duration (30s, 500ms, 2m, 1h or plain seconds),
rounded up.
*/}}
{{- define "splitserve.durationSeconds" -}}
{{- $d := toString . }}
{{- if hasSuffix "ms" $d }}
{{- $ms := trimSuffix "ms" $d | int64 }}
{{- div (add $ms 999) 1000 }}
{{- else if hasSuffix "s" $d }}
{{- trimSuffix "s" $d | int64 }}
{{- else if hasSuffix "m" $d }}
{{- mul (trimSuffix "m" $d | int64) 60 }}
{{- else if hasSuffix "h" $d }}
{{- mul (trimSuffix "h" $d | int64) 3600 }}
{{- else }}
{{- $d | int64 }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the drain
(config.shutdownGrace), then a margin for the process to exit.
*/}}
{{- define "splitserve.terminationGracePeriodSeconds" -}}
{{- $grace := include "splitserve.durationSeconds" .Values.config.shutdownGrace | int64 }}
{{- add .Values.preStopSleepSeconds $grace .Values.terminationGracePaddingSeconds }}
{{- end }}

{{/*
A number as decimal digits: values arrive as float64, which toString would
print as 1e+06. Strings (auto) pass through.
*/}}
{{- define "splitserve.int" -}}
{{- if kindIs "string" . }}
{{- . }}
{{- else }}
{{- int64 . | toString }}
{{- end }}
{{- end }}

{{/*
A number from the values as the server parses it: whole floats as digits
(1073741824, not 1.073741824e+09), fractions as they are (0.001), strings as
they are.
*/}}
{{- define "splitserve.num" -}}
{{- if kindIs "float64" . }}
{{- ternary (int64 . | toString) (toString .) (eq (float64 (int64 .)) .) }}
{{- else if kindIs "string" . }}
{{- . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
A per-model setting of the training section as the [NAME=]VALUE list its flag
reads: one value for every model, or a map {NAME: value} as NAME=VALUE,...
(sorted by name).
*/}}
{{- define "splitserve.perModel" -}}
{{- if kindIs "map" . }}
{{- $items := list }}
{{- range $name, $v := . }}
{{- $items = append $items (printf "%s=%s" $name (include "splitserve.num" $v)) }}
{{- end }}
{{- join "," $items }}
{{- else }}
{{- include "splitserve.num" . }}
{{- end }}
{{- end }}

{{/*
Pods of the Deployment (without an HPA): replicaCount, or by default 2, and 1
with training.enabled.
*/}}
{{- define "splitserve.replicas" -}}
{{- if not (kindIs "invalid" .Values.replicaCount) }}
{{- include "splitserve.int" .Values.replicaCount }}
{{- else }}
{{- ternary 1 2 (.Values.training.enabled | default false) }}
{{- end }}
{{- end }}

{{/*
config.maxConnectionAge as set, or its default: 5m for inference, none for the
training pod (one pod: a GOAWAY would only interrupt it). Empty: not set.
(dict "root" $ "training" bool)
*/}}
{{- define "splitserve.maxConnectionAge" -}}
{{- $age := .root.Values.config.maxConnectionAge }}
{{- if not (kindIs "invalid" $age) }}
{{- include "splitserve.num" $age }}
{{- else if not .training }}
{{- "5m" }}
{{- end }}
{{- end }}

{{/*
Name of the checkpoint claim: training.checkpoints.existingClaim or the one the
chart creates.
*/}}
{{- define "splitserve.checkpointClaim" -}}
{{- default (printf "%s-checkpoints" (include "splitserve.fullname" .)) .Values.training.checkpoints.existingClaim }}
{{- end }}

{{/*
The Deployment's models as a JSON list ({name, spec, ...} items): config.models,
or when it is empty the built-in mlp=builtin:mlp:512x1024x512 (what the binary
serves without --model), unless modelRepository.enabled: then none, and the
repository's models are the only ones.
*/}}
{{- define "splitserve.models" -}}
{{- if .Values.config.models }}
{{- toJson .Values.config.models }}
{{- else if (default (dict) .Values.modelRepository).enabled }}
{{- "[]" }}
{{- else }}
{{- toJson (list (dict "name" "mlp" "spec" "builtin:mlp:512x1024x512")) }}
{{- end }}
{{- end }}

{{/*
Where the init container of modelRepository.source=image mounts the emptyDir it
copies the repository into (the server mounts it at modelRepository.mountPath).
*/}}
{{- define "splitserve.modelRepositoryCopyDir" -}}
/mnt/model-repository
{{- end }}

{{/*
The image of modelRepository.source=image: the digest wins over the tag.
*/}}
{{- define "splitserve.modelRepositoryImage" -}}
{{- $img := .Values.modelRepository.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $img.tag }}
{{- end }}
{{- end }}

{{- define "splitserve.device" -}}
{{- if .Values.config.device }}
{{- .Values.config.device }}
{{- else }}
{{- ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- end }}
{{- end }}

{{/*
SPLITSERVE_* settings of the Deployment's server container as a YAML list of
EnvVar; entries of extraEnv with the same name replace them.
*/}}
{{- define "splitserve.env" -}}
{{- include "splitserve.serverEnv" (dict "root" . "kserve" false) }}
{{- end }}

{{/*
The same settings for the container of the KServe ServingRuntime: the model is
the file KServe's storage initializer puts under /mnt/models, named after the
InferenceService ({{.Name}} is KServe's placeholder, filled in per
InferenceService); ports are KServe's; the Deployment's models, model
repository, training, TLS and tokens do not apply (their files and Secrets are the
Deployment's). kserve.servingRuntime.extraEnv replaces entries of the same name.
*/}}
{{- define "splitserve.kserveEnv" -}}
{{- include "splitserve.serverEnv" (dict "root" . "kserve" true) }}
{{- end }}

{{/*
Both of the above: (dict "root" $ "kserve" bool).
*/}}
{{- define "splitserve.serverEnv" -}}
{{- $root := .root }}
{{- $kserve := .kserve }}
{{- $c := $root.Values.config }}
{{- $sr := $root.Values.kserve.servingRuntime }}
{{- $models := list }}
{{- $warmups := list }}
{{- $batch := list (include "splitserve.int" $c.maxBatchSize) }}
{{- $timeouts := list (include "splitserve.int" $c.batchTimeoutUs) }}
{{- $mr := default (dict) $root.Values.modelRepository }}
{{- if not $kserve }}
{{- range (include "splitserve.models" $root | fromJsonArray) }}
{{- $models = append $models (printf "%s=%s" .name .spec) }}
{{- if .warmupShape }}
{{- $warmups = append $warmups (printf "%s=%s" .name .warmupShape) }}
{{- end }}
{{- if hasKey . "maxBatchSize" }}
{{- $batch = append $batch (printf "%s=%s" .name (include "splitserve.int" .maxBatchSize)) }}
{{- end }}
{{- if hasKey . "batchTimeoutUs" }}
{{- $timeouts = append $timeouts (printf "%s=%s" .name (include "splitserve.int" .batchTimeoutUs)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $env := list }}
{{- if $kserve }}
{{- if not (kindIs "invalid" $sr.grpcPort) }}
{{- $env = append $env (dict "name" "SPLITSERVE_GRPC_ADDR" "value" (printf "0.0.0.0:%s" (include "splitserve.int" $sr.grpcPort))) }}
{{- end }}
{{- $env = concat $env (list
  (dict "name" "SPLITSERVE_HTTP_ADDR" "value" (printf "0.0.0.0:%s" (include "splitserve.int" $sr.httpPort)))
  (dict "name" "SPLITSERVE_METRICS_ADDR" "value" (printf "0.0.0.0:%s" (include "splitserve.int" $root.Values.ports.metrics)))
  (dict "name" "SPLITSERVE_MODEL" "value" (printf "{{.Name}}=/mnt/models/%s" $sr.modelFile))
) }}
{{- with $sr.warmupShape }}
{{- $warmups = list (printf "{{.Name}}=%s" .) }}
{{- end }}
{{- else }}
{{- $env = list
  (dict "name" "SPLITSERVE_GRPC_ADDR" "value" (printf "0.0.0.0:%s" (include "splitserve.int" $root.Values.ports.grpc)))
  (dict "name" "SPLITSERVE_HTTP_ADDR" "value" (printf "0.0.0.0:%s" (include "splitserve.int" $root.Values.ports.http)))
  (dict "name" "SPLITSERVE_METRICS_ADDR" "value" (printf "0.0.0.0:%s" (include "splitserve.int" $root.Values.ports.metrics)))
}}
{{- /* Empty only with a model repository: then no --model, so no built-in default either. */}}
{{- if $models }}
{{- $env = append $env (dict "name" "SPLITSERVE_MODEL" "value" (join "," $models)) }}
{{- end }}
{{- if $mr.enabled }}
{{- $env = concat $env (list
  (dict "name" "SPLITSERVE_MODEL_REPOSITORY" "value" $mr.mountPath)
  (dict "name" "SPLITSERVE_MODEL_CONTROL_MODE" "value" $mr.controlMode)
) }}
{{- if eq $mr.controlMode "poll" }}
{{- $env = append $env (dict "name" "SPLITSERVE_REPOSITORY_POLL_SECS" "value" (include "splitserve.int" $mr.pollSecs)) }}
{{- end }}
{{- if and (eq $mr.controlMode "explicit") $mr.loadModels }}
{{- $env = append $env (dict "name" "SPLITSERVE_LOAD_MODEL" "value" (join "," $mr.loadModels)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $warmups }}
{{- $env = append $env (dict "name" "SPLITSERVE_WARMUP_SHAPE" "value" (join "," $warmups)) }}
{{- end }}
{{- $env = concat $env (list
  (dict "name" "SPLITSERVE_DEVICE" "value" (include "splitserve.device" $root))
  (dict "name" "SPLITSERVE_WORKERS" "value" (include "splitserve.int" $c.workers))
  (dict "name" "SPLITSERVE_INTRA_OP_THREADS" "value" (include "splitserve.int" $c.intraOpThreads))
  (dict "name" "SPLITSERVE_INTER_OP_THREADS" "value" (include "splitserve.int" $c.interOpThreads))
  (dict "name" "SPLITSERVE_IO_THREADS" "value" (include "splitserve.int" $c.ioThreads))
) }}
{{- if $c.cpuLimitFromResources }}
{{- $container := ternary "kserve-container" "splitserve" $kserve }}
{{- $env = append $env (dict "name" "SPLITSERVE_CPU_LIMIT" "valueFrom" (dict "resourceFieldRef" (dict "containerName" $container "resource" "limits.cpu" "divisor" "1"))) }}
{{- end }}
{{- if $c.allowOversubscription }}
{{- $env = append $env (dict "name" "SPLITSERVE_ALLOW_OVERSUBSCRIPTION" "value" "true") }}
{{- end }}
{{- $env = concat $env (list
  (dict "name" "SPLITSERVE_QUEUE_CAPACITY" "value" (include "splitserve.int" $c.queueCapacity))
  (dict "name" "SPLITSERVE_MAX_BATCH_SIZE" "value" (join "," $batch))
  (dict "name" "SPLITSERVE_BATCH_TIMEOUT_US" "value" (join "," $timeouts))
) }}
{{- if not (kindIs "invalid" $c.maxElements) }}
{{- $env = append $env (dict "name" "SPLITSERVE_MAX_ELEMENTS" "value" (include "splitserve.int" $c.maxElements)) }}
{{- end }}
{{- if not (kindIs "invalid" $c.maxMessageBytes) }}
{{- $env = append $env (dict "name" "SPLITSERVE_MAX_MESSAGE_BYTES" "value" (include "splitserve.int" $c.maxMessageBytes)) }}
{{- end }}
{{- $env = concat $env (list
  (dict "name" "SPLITSERVE_SHUTDOWN_GRACE" "value" (toString $c.shutdownGrace))
  (dict "name" "SPLITSERVE_STALL_TIMEOUT" "value" (toString $c.stallTimeout))
  (dict "name" "SPLITSERVE_LOG_FORMAT" "value" $c.logFormat)
) }}
{{- if $c.otlpEndpoint }}
{{- $env = append $env (dict "name" "SPLITSERVE_OTLP_ENDPOINT" "value" $c.otlpEndpoint) }}
{{- end }}
{{- if $c.accessLog }}
{{- $env = append $env (dict "name" "SPLITSERVE_ACCESS_LOG" "value" "true") }}
{{- end }}
{{- $t := $root.Values.training }}
{{- /* KServe's predictors never train: the inference default applies to them. */}}
{{- $age := include "splitserve.maxConnectionAge" (dict "root" $root "training" (and $t.enabled (not $kserve))) }}
{{- if $age }}
{{- $env = append $env (dict "name" "SPLITSERVE_MAX_CONNECTION_AGE" "value" $age) }}
{{- if gt (include "splitserve.durationSeconds" $age | int64) 0 }}
{{- $env = append $env (dict "name" "SPLITSERVE_MAX_CONNECTION_AGE_GRACE" "value" (include "splitserve.num" $c.maxConnectionAgeGrace)) }}
{{- end }}
{{- end }}
{{- if and $t.enabled (not $kserve) }}
{{- /* Empty only with a model repository, whose config.pbtxt files say which models train. */}}
{{- if $t.models }}
{{- $env = append $env (dict "name" "SPLITSERVE_TRAINABLE" "value" (join "," $t.models)) }}
{{- end }}
{{- range $key, $var := dict
  "optimizer" "SPLITSERVE_OPTIMIZER"
  "learningRate" "SPLITSERVE_LEARNING_RATE"
  "momentum" "SPLITSERVE_MOMENTUM"
  "weightDecay" "SPLITSERVE_WEIGHT_DECAY"
  "adamBetas" "SPLITSERVE_ADAM_BETAS"
  "adamEps" "SPLITSERVE_ADAM_EPS"
}}
{{- $v := index $t $key }}
{{- if not (kindIs "invalid" $v) }}
{{- $env = append $env (dict "name" $var "value" (include "splitserve.perModel" $v)) }}
{{- end }}
{{- end }}
{{- $env = append $env (dict "name" "SPLITSERVE_CHECKPOINT_DIR" "value" $t.checkpoints.mountPath) }}
{{- if not (kindIs "invalid" $t.checkpointEvery) }}
{{- $env = append $env (dict "name" "SPLITSERVE_CHECKPOINT_EVERY" "value" (include "splitserve.int" $t.checkpointEvery)) }}
{{- end }}
{{- $env = append $env (dict "name" "SPLITSERVE_CHECKPOINT_KEEP" "value" (include "splitserve.int" $t.checkpointKeep)) }}
{{- if not (kindIs "invalid" $t.activationCacheBytes) }}
{{- $env = append $env (dict "name" "SPLITSERVE_ACTIVATION_CACHE_BYTES" "value" (include "splitserve.int" $t.activationCacheBytes)) }}
{{- end }}
{{- if not (kindIs "invalid" $t.activationTtl) }}
{{- $env = append $env (dict "name" "SPLITSERVE_ACTIVATION_TTL" "value" (toString $t.activationTtl)) }}
{{- end }}
{{- end }}
{{- $limits := default (dict) $c.limits }}
{{- range $key, $var := dict
  "maxConnections" "SPLITSERVE_MAX_CONNECTIONS"
  "maxConcurrentStreams" "SPLITSERVE_MAX_CONCURRENT_STREAMS"
  "requestBodyTimeout" "SPLITSERVE_REQUEST_BODY_TIMEOUT"
  "maxInflightBytes" "SPLITSERVE_MAX_INFLIGHT_BYTES"
  "maxDecompressedBytes" "SPLITSERVE_MAX_DECOMPRESSED_BYTES"
  "idleConnectionTimeout" "SPLITSERVE_IDLE_CONNECTION_TIMEOUT"
  "maxLearningRate" "SPLITSERVE_MAX_LEARNING_RATE"
  "maxAccumulationSteps" "SPLITSERVE_MAX_ACCUMULATION_STEPS"
}}
{{- /* null in the values deletes the key: only keys that are there are set. */}}
{{- if and (hasKey $limits $key) (not (kindIs "invalid" (index $limits $key))) }}
{{- $v := index $limits $key }}
{{- $env = append $env (dict "name" $var "value" (include "splitserve.num" $v)) }}
{{- end }}
{{- end }}
{{- if not $kserve }}
{{- if $root.Values.tls.enabled }}
{{- $env = concat $env (list
  (dict "name" "SPLITSERVE_TLS_CERT" "value" "/etc/splitserve/tls/tls.crt")
  (dict "name" "SPLITSERVE_TLS_KEY" "value" "/etc/splitserve/tls/tls.key")
) }}
{{- if $root.Values.tls.clientCA.secretName }}
{{- $env = append $env (dict "name" "SPLITSERVE_TLS_CLIENT_CA" "value" (printf "/etc/splitserve/client-ca/%s" $root.Values.tls.clientCA.key)) }}
{{- end }}
{{- end }}
{{- if $root.Values.auth.tokenSecretName }}
{{- $env = append $env (dict "name" "SPLITSERVE_AUTH_TOKEN_FILE" "value" (printf "/etc/splitserve/auth/%s" $root.Values.auth.tokenSecretKey)) }}
{{- end }}
{{- end }}
{{- if $root.Values.gpu.enabled }}
{{- /* The CUDA JIT cache would go to $HOME, which the read-only root cannot hold. */}}
{{- $env = append $env (dict "name" "CUDA_CACHE_PATH" "value" "/tmp/cuda-cache") }}
{{- end }}
{{- $extra := ternary $sr.extraEnv $root.Values.extraEnv $kserve }}
{{- $overridden := dict }}
{{- range $extra }}
{{- $_ := set $overridden .name true }}
{{- end }}
{{- $out := list }}
{{- range $env }}
{{- if not (hasKey $overridden .name) }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- concat $out $extra | toYaml }}
{{- end }}
