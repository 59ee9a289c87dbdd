from django.core.management.base import BaseCommand

from agentsvc.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="a label for the key, e.g. 'billing-service'")
        parser.add_argument("--owner", help="the tenant that owns the key (default: NAME)")
        parser.add_argument("--requests-per-minute", type=int)
        parser.add_argument("--runs-per-minute", type=int)
        parser.add_argument("--tokens-per-minute", type=int)
        parser.add_argument("--max-active-runs", type=int)

    def handle(self, *args, **options):
        key, raw = api_key_create(
            owner_name=options["owner"] or options["name"],
            name=options["name"],
            requests_per_minute=options["requests_per_minute"],
            runs_per_minute=options["runs_per_minute"],
            tokens_per_minute=options["tokens_per_minute"],
            max_active_runs=options["max_active_runs"],
        )
        self.stderr.write(f"Created key {key} for owner {key.owner}. It is shown only now:")
        self.stdout.write(raw)
