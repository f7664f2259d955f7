{{- define "corral.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "corral.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "corral.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "corral.image" -}}
{{- $tag := .Values.image.tag | default .Values.image.variant -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "corral.secretName" -}}
{{- .Values.secret.existingSecret | default (printf "%s-secret" (include "corral.fullname" .)) -}}
{{- end -}}

{{- define "corral.nodeGrace" -}}
{{- $min := add .Values.node.preStopWait .Values.node.drainSettle .Values.node.drainTimeout -}}
{{- if .Values.node.terminationGracePeriodSeconds -}}
{{- if le (int .Values.node.terminationGracePeriodSeconds) (int $min) -}}
{{- fail (printf "node.terminationGracePeriodSeconds must exceed preStopWait + drainSettle + drainTimeout (%d)" (int $min)) -}}
{{- end -}}
{{- .Values.node.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $min 15 -}}
{{- end -}}
{{- end -}}

{{- define "corral.frontGrace" -}}
{{- if .Values.front.terminationGracePeriodSeconds -}}
{{- if le (int .Values.front.terminationGracePeriodSeconds) (int .Values.front.drainTimeout) -}}
{{- fail "front.terminationGracePeriodSeconds must exceed front.drainTimeout" -}}
{{- end -}}
{{- .Values.front.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add .Values.front.drainTimeout 15 -}}
{{- end -}}
{{- end -}}

{{/* The token and keys as environment variables (pydantic-settings overrides). */}}
{{- define "corral.secretEnv" -}}
- name: CORRAL_CLUSTER__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "corral.secretName" . }}
      key: token
- name: CORRAL_SERVER__API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "corral.secretName" . }}
      key: api-keys
      optional: true
{{- end -}}
