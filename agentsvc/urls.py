from django.contrib import admin
from django.urls import include, path

from agentsvc import views
from runs import api as runs_api
from runs import sse as runs_sse

api_v1 = [
    path("chains", runs_api.ChainListApi.as_view()),
    path("chains/<slug:name>", runs_api.ChainDetailApi.as_view()),
    path("chains/<slug:name>/runs", runs_api.RunCreateApi.as_view()),
    path("chains/<slug:name>/invoke", runs_api.RunInvokeApi.as_view()),
    path("runs", runs_api.RunListApi.as_view()),
    path("runs/<uuid:run_id>", runs_api.RunDetailApi.as_view()),
    path("runs/<uuid:run_id>/cancel", runs_api.RunCancelApi.as_view()),
    path("runs/<uuid:run_id>/events", runs_sse.run_events),
    path("chains/<slug:name>/stream", runs_sse.chain_stream),
]

urlpatterns = [
    path("healthz", views.healthz),
    path("api/problems/<slug:code>", views.problem_page),
    path("api/v1/", include(api_v1)),
    path("admin/", admin.site.urls),
]

handler404 = "agentsvc.views.handler404"
handler500 = "agentsvc.views.handler500"
