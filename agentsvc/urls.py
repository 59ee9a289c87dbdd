from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularSwaggerSplitView

from agentsvc import views
from runs import api as runs_api
from runs import dashboard
from runs import sse as runs_sse
from schedules import api as schedules_api
from webhooks import api as webhooks_api

api_v1 = [
    path("chains", runs_api.ChainListApi.as_view()),
    path("chains/<slug:name>", runs_api.ChainDetailApi.as_view()),
    path("chains/<slug:name>/runs", runs_api.RunCreateApi.as_view()),
    path("chains/<slug:name>/invoke", runs_api.RunInvokeApi.as_view()),
    path("chains/<slug:name>/runs/batch", runs_api.RunBatchCreateApi.as_view()),
    path("runs", runs_api.RunListApi.as_view()),
    path("runs/<uuid:run_id>", runs_api.RunDetailApi.as_view()),
    path("runs/<uuid:run_id>/cancel", runs_api.RunCancelApi.as_view()),
    path("runs/<uuid:run_id>/rerun", runs_api.RunRerunApi.as_view()),
    path("runs/<uuid:run_id>/input", runs_api.RunInputApi.as_view()),
    path("stream-tickets", runs_api.StreamTicketCreateApi.as_view()),
    # JSON page or SSE by Accept; the stream views are async, outside DRF.
    path("runs/<uuid:run_id>/events", runs_sse.run_events),
    path("chains/<slug:name>/stream", runs_sse.chain_stream),
    path("webhook-endpoints", webhooks_api.WebhookEndpointsApi.as_view()),
    path("webhook-endpoints/<uuid:endpoint_id>", webhooks_api.WebhookEndpointApi.as_view()),
    path(
        "webhook-endpoints/<uuid:endpoint_id>/rotate-secret",
        webhooks_api.WebhookEndpointRotateSecretApi.as_view(),
    ),
    path(
        "webhook-endpoints/<uuid:endpoint_id>/test",
        webhooks_api.WebhookEndpointTestApi.as_view(),
    ),
    path(
        "webhook-endpoints/<uuid:endpoint_id>/recover",
        webhooks_api.WebhookEndpointRecoverApi.as_view(),
    ),
    path("runs/<uuid:run_id>/deliveries", webhooks_api.RunDeliveriesApi.as_view()),
    path("runs/<uuid:run_id>/webhooks/resend", webhooks_api.RunWebhooksResendApi.as_view()),
    path("deliveries/<uuid:delivery_id>/resend", webhooks_api.DeliveryResendApi.as_view()),
    path("chains/<slug:name>/schedules", schedules_api.ScheduleCreateApi.as_view()),
    path("schedules", schedules_api.ScheduleListApi.as_view()),
    path("schedules/<uuid:schedule_id>", schedules_api.ScheduleDetailApi.as_view()),
    path("schedules/<uuid:schedule_id>/pause", schedules_api.SchedulePauseApi.as_view()),
    path("schedules/<uuid:schedule_id>/resume", schedules_api.ScheduleResumeApi.as_view()),
]

urlpatterns = [
    path("healthz", views.healthz),
    path("readyz", views.readyz),
    path("metrics", views.metrics),
    path("api/problems/<slug:code>", views.problem_page),
    path("api/v1/", include(api_v1)),
    path("api/v1/schema", views.SchemaView.as_view(), name="schema"),
    # Swagger UI with its start-up script as a file of its own (`?script`), not inline: the
    # page's Content-Security-Policy allows scripts only from this origin's files.
    path("api/docs", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="docs"),
    path("admin/", admin.site.urls),
    path("dashboard/", dashboard.dashboard, name="dashboard"),
    path("dashboard/state", dashboard.state, name="dashboard-state"),
    path("dashboard/series", dashboard.series, name="dashboard-series"),
    path("dashboard/runs/<uuid:run_id>/cancel", dashboard.run_cancel, name="dashboard-cancel"),
]

handler404 = "agentsvc.views.handler404"
handler500 = "agentsvc.views.handler500"
