import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsvc.settings")

django_app = get_asgi_application()

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

# Static files (admin, API docs) are served in-process from the installed apps: they are few and
# small, and no outside network or build step is needed. Everything else goes to Django.
application = ASGIStaticFilesHandler(django_app)
