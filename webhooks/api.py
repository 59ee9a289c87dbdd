"""The webhooks API (API.md section 6): one view per operation, owner-scoped."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from agentsvc.idempotency import IdempotentMixin
from agentsvc.openapi import IDEMPOTENCY_KEY, problems
from runs import selectors as run_selectors
from runs.api import CURSOR, LIMIT, MAX_LIMIT, _check_query, _int_param, _page
from webhooks import selectors, services
from webhooks.presenters import delivery_dict, endpoint_dict
from webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    EndpointOut,
    EndpointPage,
    EndpointWithSecretOut,
    ResentPage,
)
from webhooks.serializers import EndpointCreateInput, EndpointUpdateInput


class WebhookEndpointsApi(IdempotentMixin, APIView):
    """GET lists (endpoint list), POST registers (endpoint create)."""

    @extend_schema(
        operation_id="webhook_endpoints_list",
        parameters=[LIMIT, CURSOR],
        responses={200: EndpointPage, **problems()},
    )
    def get(self, request):
        _check_query(request, {"limit", "cursor"})
        endpoints, next_cursor = selectors.endpoint_list(
            owner=request.user,
            cursor=request.query_params.get("cursor") or None,
            limit=_int_param(request, "limit", 20, 1, MAX_LIMIT),
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
        _check_query(request, set())
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


class RunDeliveriesApi(APIView):
    @extend_schema(
        operation_id="runs_deliveries",
        parameters=[LIMIT, CURSOR],
        responses={200: DeliveryPage, **problems(404)},
    )
    def get(self, request, run_id):
        _check_query(request, {"limit", "cursor"})
        run = run_selectors.run_get(owner=request.user, run_id=run_id)
        deliveries, next_cursor = selectors.run_deliveries(
            run=run,
            cursor=request.query_params.get("cursor") or None,
            limit=_int_param(request, "limit", 20, 1, MAX_LIMIT),
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
