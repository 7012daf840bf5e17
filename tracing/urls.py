from django.urls import path

from . import views

app_name = "tracing"
urlpatterns = [
    path("", views.trace_list_view, name="list"),
    path("<uuid:run_id>/", views.trace_detail_view, name="detail"),
    path("<uuid:run_id>/spans/<uuid:span_id>/", views.span_detail_view, name="span"),
]
