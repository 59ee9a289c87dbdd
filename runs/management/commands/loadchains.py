import json
from pathlib import Path

import yaml
from django.core.management.base import BaseCommand, CommandError

from runs.chains import ChainDefinitionError, chain_publish


class Command(BaseCommand):
    help = "Load chains from a YAML or JSON file; a changed chain becomes a new version."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)

    def handle(self, *args, **options):
        path: Path = options["file"]
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise CommandError(f"{path}: {e}") from e
        chains = data.get("chains") if isinstance(data, dict) else data
        if not isinstance(chains, list):
            raise CommandError(f"{path}: expected a list of chains (or a 'chains:' key)")
        for definition in chains:
            try:
                chain, created = chain_publish(definition=definition)
            except ChainDefinitionError as e:
                raise CommandError(f"{path}: {e}") from e
            state = "published" if created else "unchanged"
            self.stdout.write(f"{chain.name} v{chain.version} {state}")
