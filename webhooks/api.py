"""The webhooks API (docs/api.md section 6): one view per operation, owner-scoped."""

from __future__ import annotations

from datetime import timedelta

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from agentsvc.idempotency import IdempotentMixin
from agentsvc.openapi import IDEMPOTENCY_KEY, problems
from runs import selectors as run_selectors
from runs.api import CURSOR, LIMIT, MAX_LIMIT, _page, check_query, int_param
from runs.timefmt import after_ms, floor_ms
from webhooks import selectors, services
from webhooks.presenters import delivery_dict, endpoint_dict
from webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    EndpointOut,
    EndpointPage,
    EndpointWithSecretOut,
    RecoveredOut,
    ResentPage,
    TestSentOut,
)
from webhooks.serializers import EndpointCreateInput, EndpointUpdateInput, RecoverInput


class WebhookEndpointsApi(IdempotentMixin, APIView):
    """GET lists (endpoint list), POST registers (endpoint create)."""

    @extend_schema(
        operation_id="webhook_endpoints_list",
        parameters=[LIMIT, CURSOR],
        responses={200: EndpointPage, **problems()},
    )
    def get(self, request):
        check_query(request.query_params, {"limit", "cursor"})
        endpoints, next_cursor = selectors.endpoint_list(
            owner=request.user,
            cursor=request.query_params.get("cursor") or None,
            limit=int_param(request.query_params, "limit", 20, 1, MAX_LIMIT),
        )
        return Response(_page([endpoint_dict(e) for e in endpoints], request, next_cursor))

    @extend_schema(
        operation_id="webhook_endpoints_create",
        request=EndpointCreateInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: EndpointWithSecretOut, **problems(409, 422)},
    )
    def post(self, request):
        body = EndpointCreateInput(data=request.data)
        body.is_valid(raise_exception=True)
        endpoint = services.endpoint_create(owner=request.user, **body.validated_data)
        return Response(
            endpoint_dict(endpoint, with_secret=True),
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/webhook-endpoints/{endpoint.id}"},
        )


class WebhookEndpointApi(APIView):
    """GET shows, PATCH changes, DELETE removes one endpoint."""

    @extend_schema(
        operation_id="webhook_endpoints_retrieve", responses={200: EndpointOut, **problems(404)}
    )
    def get(self, request, endpoint_id):
        check_query(request.query_params, set())
        endpoint = selectors.endpoint_get(owner=request.user, endpoint_id=endpoint_id)
        return Response(endpoint_dict(endpoint))

    @extend_schema(
        operation_id="webhook_endpoints_update",
        request=EndpointUpdateInput,
        responses={200: EndpointOut, **problems(404)},
    )
    def patch(self, request, endpoint_id):
        endpoint = selectors.endpoint_get(owner=request.user, endpoint_id=endpoint_id)
        body = EndpointUpdateInput(data=request.data, partial=True)
        body.is_valid(raise_exception=True)
        endpoint = services.endpoint_update(endpoint=endpoint, **body.validated_data)
        return Response(endpoint_dict(endpoint))

    @extend_schema(operation_id="webhook_endpoints_delete", responses={204: None, **problems(404)})
    def delete(self, request, endpoint_id):
        endpoint = selectors.endpoint_get(owner=request.user, endpoint_id=endpoint_id)
        services.endpoint_delete(endpoint=endpoint)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookEndpointRotateSecretApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="webhook_endpoints_rotate_secret",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={200: EndpointWithSecretOut, **problems(404, 409, 422)},
    )
    def post(self, request, endpoint_id):
        endpoint = selectors.endpoint_get(owner=request.user, endpoint_id=endpoint_id)
        endpoint = services.endpoint_rotate_secret(endpoint=endpoint)
        return Response(endpoint_dict(endpoint, with_secret=True))


class WebhookEndpointTestApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="webhook_endpoints_test",
        summary="Send a signed webhook.test event to the endpoint now",
        description="A `webhook.test` message (`data`: `{endpoint_id, url}`), signed and "
        "retried like any delivery, sent even while the endpoint is disabled. It belongs to no "
        "run, so no run's deliveries list shows it.",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: TestSentOut, **problems(404, 409, 422)},
    )
    def post(self, request, endpoint_id):
        endpoint = selectors.endpoint_get(owner=request.user, endpoint_id=endpoint_id)
        delivery = services.endpoint_test(endpoint=endpoint)
        return Response(
            {"delivery_id": str(delivery.id), "webhook_id": delivery.message_id},
            status=status.HTTP_202_ACCEPTED,
        )


class WebhookEndpointRecoverApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="webhook_endpoints_recover",
        summary="Resend every failed delivery of the endpoint since a time",
        description="Failed deliveries created at or after `since` (and at or before `until`, "
        "default now), compared at the millisecond that timestamps are shown with, are sent "
        "again now: same webhook-id, new timestamp and signature.",
        request=RecoverInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: RecoveredOut, **problems(404, 409, 422)},
    )
    def post(self, request, endpoint_id):
        endpoint = selectors.endpoint_get(owner=request.user, endpoint_id=endpoint_id)
        body = RecoverInput(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        until = data.get("until")
        try:
            ids = services.endpoint_recover(
                endpoint=endpoint,
                since=floor_ms(data["since"]),
                until=after_ms(until) - timedelta(microseconds=1) if until else None,
            )
        except OverflowError:  # until 9999-12-31T23:59:59.999Z
            ids = services.endpoint_recover(endpoint=endpoint, since=floor_ms(data["since"]))
        return Response(
            {"count": len(ids), "delivery_ids": [str(i) for i in ids]},
            status=status.HTTP_202_ACCEPTED,
        )


class RunDeliveriesApi(APIView):
    @extend_schema(
        operation_id="runs_deliveries",
        parameters=[LIMIT, CURSOR],
        responses={200: DeliveryPage, **problems(404)},
    )
    def get(self, request, run_id):
        check_query(request.query_params, {"limit", "cursor"})
        run = run_selectors.run_get(owner=request.user, run_id=run_id)
        deliveries, next_cursor = selectors.run_deliveries(
            run=run,
            cursor=request.query_params.get("cursor") or None,
            limit=int_param(request.query_params, "limit", 20, 1, MAX_LIMIT),
        )
        return Response(_page([delivery_dict(d) for d in deliveries], request, next_cursor))


class DeliveryResendApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="deliveries_resend",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: DeliveryOut, **problems(404, 409, 422)},
    )
    def post(self, request, delivery_id):
        delivery = selectors.delivery_get(owner=request.user, delivery_id=delivery_id)
        services.delivery_resend(delivery=delivery)
        delivery = selectors.delivery_get(owner=request.user, delivery_id=delivery_id)
        return Response(delivery_dict(delivery), status=status.HTTP_202_ACCEPTED)


class RunWebhooksResendApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_webhooks_resend",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: ResentPage, **problems(404, 409, 422)},
    )
    def post(self, request, run_id):
        run = run_selectors.run_get(owner=request.user, run_id=run_id)
        deliveries = services.run_webhooks_resend(run=run)
        return Response(
            {"results": [{"id": str(d.id), "url": d.url, "status": d.status} for d in deliveries]},
            status=status.HTTP_202_ACCEPTED,
        )
