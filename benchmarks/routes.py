"""A realistic route table: GitHub REST API paths (with {params}), repeated under service
prefixes until the table has the size a benchmark asks for."""

GITHUB_PATHS = [
    "/user", "/user/repos", "/user/orgs", "/user/keys", "/user/keys/{key_id}", "/users/{username}",
    "/users/{username}/repos", "/users/{username}/gists", "/users/{username}/followers",
    "/orgs/{org}", "/orgs/{org}/repos", "/orgs/{org}/members", "/orgs/{org}/members/{username}",
    "/orgs/{org}/teams", "/orgs/{org}/teams/{team_slug}", "/orgs/{org}/teams/{team_slug}/repos",
    "/repos/{owner}/{repo}", "/repos/{owner}/{repo}/issues", "/repos/{owner}/{repo}/issues/{number}",
    "/repos/{owner}/{repo}/issues/{number}/comments", "/repos/{owner}/{repo}/issues/comments/{id}",
    "/repos/{owner}/{repo}/pulls", "/repos/{owner}/{repo}/pulls/{number}",
    "/repos/{owner}/{repo}/pulls/{number}/files", "/repos/{owner}/{repo}/pulls/{number}/reviews",
    "/repos/{owner}/{repo}/commits", "/repos/{owner}/{repo}/commits/{ref}",
    "/repos/{owner}/{repo}/branches", "/repos/{owner}/{repo}/branches/{branch}",
    "/repos/{owner}/{repo}/contents/{path...}", "/repos/{owner}/{repo}/releases",
    "/repos/{owner}/{repo}/releases/{release_id}", "/repos/{owner}/{repo}/releases/latest",
    "/repos/{owner}/{repo}/tags", "/repos/{owner}/{repo}/actions/runs",
    "/repos/{owner}/{repo}/actions/runs/{run_id}", "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs",
    "/repos/{owner}/{repo}/hooks", "/repos/{owner}/{repo}/hooks/{hook_id}",
    "/repos/{owner}/{repo}/collaborators", "/repos/{owner}/{repo}/collaborators/{username}",
    "/repos/{owner}/{repo}/git/refs/{ref...}", "/repos/{owner}/{repo}/git/trees/{tree_sha}",
    "/gists", "/gists/{gist_id}", "/gists/{gist_id}/comments", "/search/code", "/search/issues",
    "/search/repositories", "/notifications", "/notifications/threads/{thread_id}",
    "/rate_limit", "/emojis", "/events", "/feeds", "/meta", "/markdown", "/licenses/{license}",
]

# Requests that hit routes deep in the table: exact, params, a long tail, and a miss.
LOOKUPS = [
    ("GET", "/svc0/repos/octo/hello/issues/42/comments"),
    ("GET", "/svc{last}/repos/octo/hello/contents/src/app/main.py"),
    ("GET", "/svc{mid}/users/alice"),
    ("GET", "/svc{mid}/rate_limit"),
    ("GET", "/svc{last}/nothing/here"),
]


def route_table(size: int) -> list[dict]:
    routes = []
    i = 0
    while len(routes) < size:
        for path in GITHUB_PATHS:
            if len(routes) >= size:
                break
            routes.append({"name": f"r{len(routes)}", "match": {"paths": [f"/svc{i}{path}"]},
                           "service": "api"})
        i += 1
    return routes


def lookups(size: int) -> list[tuple[str, str]]:
    prefixes = -(-size // len(GITHUB_PATHS))
    return [(m, p.format(last=prefixes - 1, mid=prefixes // 2)) for m, p in LOOKUPS]
