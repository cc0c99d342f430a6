{{/*
Names, labels and the pieces shared by the gateway and worker pod specs.
*/}}

{{- define "moe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix; kept to 30 characters so "<fullname>-worker-<pool>" fits in 63. */}}
{{- define "moe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "moe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "moe.labels" -}}
helm.sh/chart: {{ include "moe.chart" .ctx }}
{{ include "moe.selectorLabels" . }}
app.kubernetes.io/part-of: moe-cluster
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. Call with (dict "ctx" $ "image" .image). */}}
{{- define "moe.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Offload profile as a label value: "n-cpu-moe:12" -> "n-cpu-moe-12". */}}
{{- define "moe.profileLabel" -}}
{{- . | replace ":" "-" }}
{{- end }}

{{/*
Deep merge of .src into .dst in place (maps merge key by key; scalars and lists replace, false and 0
included — unlike sprig's merge functions, which skip zero values).
*/}}
{{- define "moe.deepMerge" -}}
{{- $dst := .dst }}
{{- range $k, $v := .src }}
{{- if and (kindIs "map" $v) (kindIs "map" (index $dst $k)) }}
{{- include "moe.deepMerge" (dict "dst" (index $dst $k) "src" $v) }}
{{- else }}
{{- $_ := set $dst $k $v }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Stops rendering with a message. helm lint turns `fail` into a log line, so the helper also emits an
unparsable line: lint then fails on the same values that make helm template/install fail.
*/}}
{{- define "moe.fail" -}}
{{- fail . }}
# moe-cluster: invalid values: {{ . }}
{{ . | quote }}: [
{{- end }}

{{/* etcd ----------------------------------------------------------------------------------- */}}

{{- define "moe.etcd.fullname" -}}
{{- printf "%s-etcd" (include "moe.fullname" .) }}
{{- end }}

{{- define "moe.etcd.headless" -}}
{{- printf "%s-etcd-headless" (include "moe.fullname" .) }}
{{- end }}

{{- define "moe.etcd.scheme" -}}
{{- ternary "https" "http" .Values.etcd.tls.enabled }}
{{- end }}

{{/* Comma-separated client endpoints: every bundled member, or the external list. */}}
{{- define "moe.etcd.endpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $eps := list }}
{{- $scheme := include "moe.etcd.scheme" . }}
{{- $full := include "moe.etcd.fullname" . }}
{{- $headless := include "moe.etcd.headless" . }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $eps = append $eps (printf "%s://%s-%d.%s.%s.svc.%s:%d" $scheme $full $i $headless $.Release.Namespace $.Values.clusterDomain (int $.Values.etcd.ports.client)) }}
{{- end }}
{{- join "," $eps }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- include "moe.fail" "etcd.enabled is false: set etcd.external.endpoints" }}
{{- end }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Environment shared by gateways and workers for reaching etcd. */}}
{{- define "moe.etcd.clientEnv" -}}
- name: MOE_ETCD
  value: {{ include "moe.etcd.endpoints" . | quote }}
- name: MOE_ETCD_PREFIX
  value: {{ .Values.etcd.prefix | quote }}
{{- if .Values.etcd.auth.enabled }}
- name: MOE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.auth.existingSecret }}
      key: {{ .Values.etcd.auth.passwordKey }}
{{- end }}
{{- end }}

{{/* Flags for etcd auth and TLS (these have no fixed environment variable). */}}
{{- define "moe.etcd.clientArgs" -}}
{{- if .Values.etcd.auth.enabled }}
- --etcd-user={{ .Values.etcd.auth.username }}
{{- end }}
{{- if .Values.etcd.tls.enabled }}
- --etcd-ca=/etc/moe/etcd-tls/ca.crt
{{- if .Values.etcd.tls.clientCertAuth }}
- --etcd-cert=/etc/moe/etcd-tls/tls.crt
- --etcd-key=/etc/moe/etcd-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{- define "moe.etcd.clientVolumeMounts" -}}
{{- if .Values.etcd.tls.enabled }}
- name: etcd-tls
  mountPath: /etc/moe/etcd-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "moe.etcd.clientVolumes" -}}
{{- if .Values.etcd.tls.enabled }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.tls.clientSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* OpenTelemetry env; call with (dict "ctx" $ "service" "moe-gateway" "attrs" "k=v,..."). */}}
{{- define "moe.otelEnv" -}}
{{- $o := .ctx.Values.otel }}
{{- if $o.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $o.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" }}
{{- with .attrs }}{{ $attrs = append $attrs . }}{{ end }}
{{- with $o.resourceAttributes }}{{ $attrs = append $attrs . }}{{ end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}

{{/* Downward-API env every pod gets first, so later values can use $(POD_NAME) etc. */}}
{{- define "moe.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/*
gRPC probe, or a TCP probe when the port serves TLS (kubelet gRPC probes are plaintext only).
Call with (dict "port" 50051 "tls" false "probe" .probes.readiness).
*/}}
{{- define "moe.grpcProbe" -}}
{{- if .tls }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
{{- with .service }}
  service: {{ . }}
{{- end }}
{{- end }}
{{- with .probe }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{/* TLS between gateways and workers ---------------------------------------------------------- */}}

{{/* The name gateways verify worker certificates against (workers are dialled by pod IP). */}}
{{- define "moe.tls.workerServerName" -}}
{{- default (printf "%s-worker.%s.svc" (include "moe.fullname" .) .Release.Namespace) .Values.tls.worker.serverName }}
{{- end }}

{{/* Fails on worker TLS settings that cannot work together (rendered by the gateway and worker templates). */}}
{{- define "moe.tls.workerChecks" -}}
{{- $w := .Values.tls.worker }}
{{- if and $w.enabled (not $w.existingSecret) }}
{{- include "moe.fail" "tls.worker.enabled needs tls.worker.existingSecret" }}
{{- end }}
{{- if and $w.requireClientCert (not $w.enabled) }}
{{- include "moe.fail" "tls.worker.requireClientCert needs tls.worker.enabled" }}
{{- end }}
{{- if and $w.requireClientCert (not $w.clientSecret) }}
{{- include "moe.fail" "tls.worker.requireClientCert needs tls.worker.clientSecret: the gateways' client certificate (tls.crt/tls.key) issued by the CA in tls.worker.existingSecret's ca.crt" }}
{{- end }}
{{- if and $w.clientSecret (not $w.enabled) }}
{{- include "moe.fail" "tls.worker.clientSecret is set but tls.worker.enabled is false" }}
{{- end }}
{{- if and $w.serverName (not $w.enabled) }}
{{- include "moe.fail" "tls.worker.serverName is set but tls.worker.enabled is false" }}
{{- end }}
{{- end }}

{{/* workers ---------------------------------------------------------------------------------- */}}

{{/*
The worker pools with workerDefaults merged in, checked, and derived fields added:
  .profileLabel        label-safe offload profile
  .fullname            Deployment/HPA/PDB name
  .tgps                terminationGracePeriodSeconds
  .kedaSignals         the KEDA signals (autoscaling.keda.signals, or by profile)
Use as: (include "moe.workerPools" . | fromJson).pools; .errors lists invalid settings (reported by
worker-deployment.yaml through moe.fail).
*/}}
{{- define "moe.workerPools" -}}
{{- $pools := list }}
{{- $errors := list }}
{{- $seen := dict }}
{{- range $p := .Values.workerPools }}
{{- if hasKey $seen $p.name }}
{{- $errors = append $errors (printf "workerPools: duplicate pool name %q" $p.name) }}
{{- end }}
{{- $_ := set $seen $p.name true }}
{{- $pool := deepCopy $.Values.workerDefaults }}
{{- include "moe.deepMerge" (dict "dst" $pool "src" (deepCopy $p)) }}
{{- if not (regexMatch "^(full|cpu-moe|auto|n-cpu-moe:[1-9][0-9]*)$" (toString $pool.offload)) }}
{{- $errors = append $errors (printf "workerPools[%s].offload: %q is not full, cpu-moe, n-cpu-moe:N or auto" $p.name (toString $pool.offload)) }}
{{- end }}
{{- if and (eq $pool.offload "auto") (not $pool.vramBudget) }}
{{- $errors = append $errors (printf "workerPools[%s]: offload auto needs vramBudget" $p.name) }}
{{- end }}
{{- $m := $pool.model | default dict }}
{{- if ne (len (pick $m "pvc" "hostPath" "initContainer")) 1 }}
{{- $errors = append $errors (printf "workerPools[%s].model: set exactly one of pvc, hostPath, initContainer" $p.name) }}
{{- end }}
{{- $_ := set $pool "replicas" (ternary $p.replicas 1 (hasKey $p "replicas")) }}
{{- $_ := set $pool "profileLabel" (include "moe.profileLabel" $pool.offload) }}
{{- $_ := set $pool "fullname" (printf "%s-worker-%s" (include "moe.fullname" $) $p.name) }}
{{- $minGrace := add (int $pool.preStopSleepSeconds) (int $pool.drainGrace) }}
{{- if kindIs "invalid" $pool.terminationGracePeriodSeconds }}
{{- $_ := set $pool "tgps" (add $minGrace 15) }}
{{- else if le (int $pool.terminationGracePeriodSeconds) $minGrace }}
{{- $errors = append $errors (printf "workerPools[%s].terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + drainGrace (%d)" $p.name (int $pool.terminationGracePeriodSeconds) $minGrace) }}
{{- else }}
{{- $_ := set $pool "tgps" (int $pool.terminationGracePeriodSeconds) }}
{{- end }}
{{- if and $pool.autoscaling.enabled (lt (int $pool.autoscaling.maxReplicas) (int $pool.autoscaling.minReplicas)) }}
{{- $errors = append $errors (printf "workerPools[%s].autoscaling.maxReplicas must be >= minReplicas" $p.name) }}
{{- end }}
{{- $k := $pool.autoscaling.keda }}
{{- if $k.enabled }}
{{- if $pool.autoscaling.enabled }}
{{- $errors = append $errors (printf "workerPools[%s]: autoscaling.enabled (HPA) and autoscaling.keda.enabled are mutually exclusive (KEDA creates its own HPA)" $p.name) }}
{{- end }}
{{- if not $k.serverAddress }}
{{- $errors = append $errors (printf "workerPools[%s]: autoscaling.keda.enabled needs autoscaling.keda.serverAddress (the Prometheus URL)" $p.name) }}
{{- end }}
{{- if lt (int $pool.autoscaling.maxReplicas) (int $pool.autoscaling.minReplicas) }}
{{- $errors = append $errors (printf "workerPools[%s].autoscaling.maxReplicas must be >= minReplicas" $p.name) }}
{{- end }}
{{- end }}
{{- $_ := set $pool "kedaSignals" ($k.signals | default (ternary (list "queue" "ttft") (list "kv") (eq $pool.offload "full"))) }}
{{- $pools = append $pools $pool }}
{{- end }}
{{- dict "pools" $pools "errors" $errors | toJson }}
{{- end }}

{{/* Worker selector labels; call with (dict "ctx" $ "pool" $pool). */}}
{{- define "moe.worker.selectorLabels" -}}
{{ include "moe.selectorLabels" (dict "ctx" .ctx "component" "worker") }}
moe-cluster.io/pool: {{ .pool.name }}
{{- end }}

{{/* Worker labels, including the offload profile; call with (dict "ctx" $ "pool" $pool). */}}
{{- define "moe.worker.labels" -}}
{{ include "moe.labels" (dict "ctx" .ctx "component" "worker") }}
moe-cluster.io/pool: {{ .pool.name }}
moe-cluster.io/offload-profile: {{ .pool.profileLabel }}
{{- end }}
