{{/*
The alerting rules: the PrometheusRule's spec (templates/prometheusrule.yaml)
and, rendered with the default values, the plain rule file
dashboards/alerts.yaml (scripts/render_deploy.py writes it; tests/deploy checks
that it is current and unit-tests it with promtool).

Thresholds come from prometheusRule.thresholds, the scrape job from
prometheusRule.job, the runbook links from prometheusRule.runbookUrl. Text in
{{`{{ ... }}`}} is Prometheus's own template, passed through: it formats
$value and the thresholds when the alert fires.
*/}}
{{- define "splitserve.alertRules" -}}
{{- $p := .Values.prometheusRule }}
{{- $t := $p.thresholds }}
{{- $job := default (include "splitserve.fullname" .) $p.job }}
{{- $deployment := include "splitserve.fullname" . }}
{{- $runbook := $p.runbookUrl }}
{{- $queue := include "splitserve.num" $t.queueSaturationRatio }}
{{- $rejected := include "splitserve.num" $t.rejectionRatio }}
{{- $internal := include "splitserve.num" $t.internalErrorsPerSecond }}
{{- $p99 := include "splitserve.num" $t.p99LatencySeconds }}
{{- $throttled := include "splitserve.num" $t.cpuThrottledSecondsPerSecond -}}
groups:
  - name: splitserve-saturation
    rules:
      - alert: SplitserveQueueSaturated
        # prometheusRule.thresholds.queueSaturationRatio
        expr: |
          max by (namespace, pod, model) (splitserve_queue_depth)
            / max by (namespace, pod, model) (splitserve_queue_capacity)
            > {{ $queue }}
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: splitserve queue of model {{`{{ $labels.model }}`}} is more than {{`{{`}} {{ $queue }} | humanizePercentage {{`}}`}} full
          description: >-
            Pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} has held its queue for
            model {{`{{ $labels.model }}`}} at {{`{{ $value | humanizePercentage }}`}} of
            capacity for 5 minutes; at 100% new requests get RESOURCE_EXHAUSTED.
          runbook_url: {{ printf "%s#splitservequeuesaturated" $runbook }}

      - alert: SplitserveHighRejectionRate
        # prometheusRule.thresholds.rejectionRatio
        expr: |
          sum by (namespace, model) (rate(splitserve_rejected_requests_total[5m]))
            / sum by (namespace, model) (rate(splitserve_requests_total[5m]))
            > {{ $rejected }}
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: splitserve rejects more than {{`{{`}} {{ $rejected }} | humanizePercentage {{`}}`}} of requests for model {{`{{ $labels.model }}`}}
          description: >-
            In namespace {{`{{ $labels.namespace }}`}}, {{`{{ $value | humanizePercentage }}`}} of
            requests for model {{`{{ $labels.model }}`}} were rejected over the last 5 minutes.
          runbook_url: {{ printf "%s#splitservehighrejectionrate" $runbook }}

  - name: splitserve-errors
    rules:
      - alert: SplitserveInternalErrors
        # prometheusRule.thresholds.internalErrorsPerSecond. INTERNAL is the
        # server's own failure (a model that returns something it cannot answer
        # with, a bug), never the client's. The 5m window and `for: 5m` let a
        # single error pass: it takes INTERNAL answers for more than 5 minutes.
        expr: |
          sum by (namespace, model) (rate(splitserve_requests_total{code="INTERNAL"}[5m]))
            > {{ $internal }}
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: splitserve answers INTERNAL errors for model {{`{{ $labels.model }}`}}
          description: >-
            In namespace {{`{{ $labels.namespace }}`}}, model {{`{{ $labels.model }}`}} has
            answered INTERNAL errors at {{`{{ $value | printf "%.3g" }}`}} per second (averaged
            over 5 minutes) for 5 minutes.
          runbook_url: {{ printf "%s#splitserveinternalerrors" $runbook }}

  - name: splitserve-latency
    rules:
      - alert: SplitserveLatencyP99AboveObjective
        # prometheusRule.thresholds.p99LatencySeconds, server-side handling; the
        # streaming StreamMonitoring call is excluded because it lasts as long as
        # the client keeps it open.
        expr: |
          histogram_quantile(0.99,
            sum by (namespace, model, le) (
              rate(splitserve_request_duration_seconds_bucket{method!~".*StreamMonitoring"}[5m])
            )
          ) > {{ $p99 }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: splitserve p99 latency for model {{`{{ $labels.model }}`}} is above {{`{{`}} {{ $p99 }} | humanizeDuration {{`}}`}}
          description: >-
            In namespace {{`{{ $labels.namespace }}`}}, the server-side p99 latency of model
            {{`{{ $labels.model }}`}} has been {{`{{ $value | humanizeDuration }}`}} for 10 minutes
            (objective {{`{{`}} {{ $p99 }} | humanizeDuration {{`}}`}}).
          runbook_url: {{ printf "%s#splitservelatencyp99aboveobjective" $runbook }}

  - name: splitserve-availability
    rules:
      - alert: SplitserveTargetDown
        # Prometheus cannot scrape a pod's /metrics: the pod is gone, hung, or
        # Prometheus is not let in (networkPolicy.metricsFrom). job: the scrape
        # job, which prometheus-operator names after the Service
        # (prometheusRule.job to change it).
        expr: |
          up{job="{{ $job }}"} == 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: Prometheus cannot scrape splitserve at {{`{{ $labels.instance }}`}}
          description: >-
            The scrape of job {{`{{ $labels.job }}`}} at {{`{{ $labels.instance }}`}} (namespace
            {{`{{ $labels.namespace }}`}}, pod {{`{{ $labels.pod }}`}}) has failed for 5 minutes: no
            metrics, so no other splitserve alert can fire for that pod.
          runbook_url: {{ printf "%s#splitservetargetdown" $runbook }}

      - alert: SplitservePodsNotReady
        # From kube-state-metrics: without it this alert never fires. Pods of the
        # Deployment that are not ready (not started, failing their readiness
        # probe, crash-looping, unschedulable). `for: 10m` outlasts a model's
        # startup (probes.startup) during a scale-up.
        expr: |
          max by (namespace, deployment) (kube_deployment_status_replicas_unavailable{deployment="{{ $deployment }}"})
            > 0
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: splitserve Deployment {{`{{ $labels.namespace }}/{{ $labels.deployment }}`}} has pods that are not ready
          description: >-
            {{`{{ $value }}`}} pod(s) of Deployment {{`{{ $labels.namespace }}/{{ $labels.deployment }}`}}
            have been unavailable for 10 minutes; the Service sends them no traffic.
          runbook_url: {{ printf "%s#splitservepodsnotready" $runbook }}

  - name: splitserve-workers
    rules:
      - alert: SplitserveWorkerStalled
        expr: max by (namespace, pod) (splitserve_workers{state="stalled"}) > 0
        for: 1m
        labels:
          severity: critical
        annotations:
          summary: splitserve worker stalled in {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}
          description: >-
            {{`{{ $value }}`}} inference worker(s) of pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}
            have been busy on a single job for longer than the stall timeout.
          runbook_url: {{ printf "%s#splitserveworkerstalled" $runbook }}

      - alert: SplitserveRepositoryLoadFailed
        # A model of the repository whose newest load failed: the pod stays Ready
        # with what it already serves, so neither probes nor PodsNotReady see it.
        expr: max by (namespace, pod) (splitserve_repository_failed_models) > 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: splitserve cannot load {{`{{ $value }}`}} model(s) of its repository in {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}
          description: >-
            Pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} has failed to load the newest
            version of {{`{{ $value }}`}} repository model(s) for 5 minutes; requests for them
            fail or reach an older version.
          runbook_url: {{ printf "%s#splitserverepositoryloadfailed" $runbook }}

  - name: splitserve-cpu
    rules:
      - alert: SplitserveThreadsAboveCpuBudget
        # intra-op threads that cannot all run at once: the thread plan keeps them
        # within the budget unless SPLITSERVE_ALLOW_OVERSUBSCRIPTION or an explicit
        # SPLITSERVE_INTRA_OP_THREADS overrides it. ceil: a 1.5-core budget allows 2.
        expr: |
          max by (namespace, pod) (splitserve_threads{pool="intra_op"})
            > on (namespace, pod)
          ceil(max by (namespace, pod) (splitserve_cpu_budget_cores))
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: splitserve intra-op threads exceed the CPU budget in {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}
          description: >-
            Pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} runs {{`{{ $value }}`}} libtorch
            intra-op threads, more than its CPU budget in cores; the threads preempt
            each other and compute latency grows.
          runbook_url: {{ printf "%s#splitservethreadsabovecpubudget" $runbook }}

      - alert: SplitserveCpuThrottled
        # prometheusRule.thresholds.cpuThrottledSecondsPerSecond (cores lost to
        # the CFS quota), averaged over 5 minutes, held for 15.
        expr: |
          sum by (namespace, pod) (rate(splitserve_cgroup_cpu_throttled_seconds_total[5m]))
            > {{ $throttled }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: splitserve is CPU-throttled in {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}
          description: >-
            Pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} has been throttled by its
            CPU quota for {{`{{ $value | printf "%.2f" }}`}} seconds per second (averaged over
            5 minutes) for the last 15 minutes (threshold {{ $throttled }}).
          runbook_url: {{ printf "%s#splitservecputhrottled" $runbook }}
{{- end }}
