"""API keys and owners in the operators' console.

A key is created through api_key_create (the same path as `manage.py createapikey`): the raw key
is shown once, in the message after saving, and only its hash is stored; the hash is never shown.
Revoking goes through api_key_revoke. Every action is recorded as a LogEntry.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages

from agentsvc.models import KEY_PREFIX, ApiKey, Owner
from agentsvc.services import api_key_create, api_key_revoke

LIMIT_FIELDS = ("requests_per_minute", "runs_per_minute", "tokens_per_minute", "max_active_runs")


@admin.register(Owner)
class OwnerAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")
    search_fields = ("name",)
    show_full_result_count = False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # deleting an owner would delete its runs and keys with it


class ApiKeyAddForm(forms.ModelForm):
    owner_name = forms.CharField(
        max_length=100, help_text="The tenant; created if it does not exist yet."
    )

    class Meta:
        model = ApiKey
        fields = ("name", *LIMIT_FIELDS)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "display_prefix",
        "active",
        "created_at",
        "last_used_at",
        *LIMIT_FIELDS,
    )
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "owner")
    list_select_related = ("owner",)
    search_fields = ("name", "prefix", "owner__name")
    show_full_result_count = False
    actions = ("revoke",)
    # key_hash is in no field list: it is never shown.
    fields = (
        "owner",
        "name",
        "display_prefix",
        ("created_at", "last_used_at", "revoked_at"),
        *LIMIT_FIELDS,
    )
    readonly_fields = ("owner", "display_prefix", "created_at", "last_used_at", "revoked_at")
    add_fields = ("owner_name", "name", *LIMIT_FIELDS)

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
            kwargs["fields"] = self.add_fields
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        return self.add_fields if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.readonly_fields

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # revoke instead: runs keep pointing at the key that started them

    @admin.display(description="key")
    def display_prefix(self, key: ApiKey) -> str:
        return f"{KEY_PREFIX}{key.prefix}…"

    @admin.display(description="active", boolean=True)
    def active(self, key: ApiKey) -> bool:
        return key.is_active

    def save_model(self, request, obj, form, change) -> None:
        if change:
            super().save_model(request, obj, form, change)  # name and limits only
            return
        key, raw = api_key_create(
            owner_name=form.cleaned_data["owner_name"],
            name=form.cleaned_data["name"],
            **{f: form.cleaned_data.get(f) for f in LIMIT_FIELDS},
        )
        # The admin's add view carries on with `obj`: make it the created key.
        obj.__dict__.update(key.__dict__)
        obj._state.adding = False
        self.message_user(
            request,
            f"The new key, shown this once (only its hash is stored): {raw}",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset) -> None:
        revoked = 0
        for key in queryset.filter(revoked_at__isnull=True):
            api_key_revoke(key=key)
            self.log_change(request, key, "Revoked.")
            revoked += 1
        self.message_user(request, f"{revoked} key(s) revoked.")
