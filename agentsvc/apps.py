from django.apps import AppConfig


class AgentsvcConfig(AppConfig):
    name = "agentsvc"
    verbose_name = "Access"
