// Drives a Snakemake HTML report the way a reader would (menu clicks), then writes what the browser
// rendered as JSON into a hidden pre element (id probe), which tests/test_report.py reads from
// `chromium --dump-dom`.
//
// The report is a React app without URL routes, so tests/test_report.py appends this script to a copy
// of report.html and names the route in the URL hash:
//   #workflow  the start page: the workflow description and the rule graph
//   #stats     Statistics: the per-job runtimes and the timeline
//   #results   Results: the Pareto plot shown (eye button) and table.csv's description (info button)
//   #summary   Results: summary.md's description
// The charts are Vega views drawn on a canvas, so vegaEmbed is wrapped to keep each view: the probe
// exports the view's scene to SVG (the text it drew) and counts the canvas's painted pixels.
'use strict';
(function () {
    const charts = [];  // {el, view} for every vegaEmbed call from now on
    const embed = window.vegaEmbed;
    window.vegaEmbed = function (el, spec, opts) {
        const node = typeof el === "string" ? document.querySelector(el) : el;
        return embed(el, spec, opts).then(function (res) {
            charts.push({ el: node, view: res.view });
            return res;
        });
    };

    // No CSS transitions: the menu's width animates when it changes, and headless Chromium's virtual
    // time does not run the animation, so the page would be measured mid-way.
    const still = document.createElement("style");
    still.textContent = "*, *::before, *::after { transition: none !important; animation: none !important; }";
    document.head.appendChild(still);

    const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

    async function until(what, find, timeoutMs = 10000) {
        for (let t = 0; t < timeoutMs; t += 50) {
            const found = find();
            if (found) return found;
            await sleep(50);
        }
        throw new Error("timed out waiting for " + what);
    }

    const text = (node) => node.textContent.trim();

    async function clickMenu(label) {
        const find = () => [...document.querySelectorAll("nav a")].find((a) => text(a) === label);
        (await until("menu item " + label, find)).click();
    }

    // A button in a result's row of the Results list (the row shows the path): button 0 shows the
    // file (or, for a file the browser cannot show, is a download link), button 1 its description.
    async function resultButton(path, index) {
        const find = () => [...document.querySelectorAll("nav tr")].find(
            (tr) => tr.cells.length > 1 && text(tr.cells[0]) === path);
        const row = await until("result row " + path, find);
        return row.cells[row.cells.length - 1].querySelectorAll("a")[index];
    }

    function paintedPixels(canvas) {
        const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
        let n = 0;
        for (let i = 0; i < data.length; i += 4) {
            const white = data[i] > 245 && data[i + 1] > 245 && data[i + 2] > 245;
            if (data[i + 3] > 0 && !white) n++;
        }
        return n;
    }

    async function chart(id) {
        // The live chart in #id (an earlier one may belong to an element React has since removed).
        const found = await until("chart #" + id, () => charts.find((c) => c.el && c.el.isConnected && c.el.id === id));
        const canvas = found.el.querySelector("canvas");
        const svg = new DOMParser().parseFromString(await found.view.toSVG(), "image/svg+xml");
        return {
            texts: [...svg.querySelectorAll("text")].map(text),
            canvas: canvas ? [canvas.width, canvas.height] : null,
            painted: canvas ? paintedPixels(canvas) : 0,
        };
    }

    function tableOf(node) {
        const cells = (tr) => [...tr.cells].map(text);
        return {
            header: [...node.querySelectorAll("thead tr")].map(cells),
            rows: [...node.querySelectorAll("tbody tr")].map(cells),
        };
    }

    const routes = {
        async workflow() {
            // Leave the start page and come back, so the rule graph is drawn through the wrapper.
            await clickMenu("Statistics");
            await clickMenu("Workflow");
            const rulegraph = await chart("rulegraph");
            const desc = await until("the workflow description", () => document.querySelector("#app div.prose"));
            const links = [...desc.querySelectorAll("a")];
            const found = {
                description: text(desc),
                links: links.map((a) => [text(a), a.getAttribute("href")]),
                rulegraph,
            };
            // The description's link to table.csv opens the table's description in the menu.
            const toTable = links.find((a) => text(a) === "table.csv");
            if (toTable) {
                toTable.click();
                const table = await until("the table from the link", () => document.querySelector("nav .prose table"));
                found.linked_table_rows = table.querySelectorAll("tbody tr").length;
            }
            return found;
        },
        async stats() {
            await clickMenu("Statistics");
            return { runtimes: await chart("runtimes"), timeline: await chart("timeline") };
        },
        async results() {
            await clickMenu("Results");
            (await resultButton("results/pareto.png", 0)).click();
            const img = await until("the Pareto plot", () => {
                const i = document.querySelector("#app img[src^='data:image/png']");
                return i && i.complete && i.naturalWidth > 0 ? i : null;
            });
            // table.csv's eye button is a download link: read, not clicked.
            const csvHref = (await resultButton("results/table.csv", 0)).getAttribute("href");
            (await resultButton("results/table.csv", 1)).click();
            const table = await until("the results table", () => document.querySelector("nav .prose table"));
            const r = img.getBoundingClientRect();  // where it is beside the description
            return {
                image: {
                    src: img.getAttribute("src"),
                    natural: [img.naturalWidth, img.naturalHeight],
                    rect: [r.left, r.top, r.width, r.height],
                },
                csv_href: csvHref,
                table: tableOf(table),
                caption: text(document.querySelector("nav .prose")),
            };
        },
        async summary() {
            await clickMenu("Results");
            const mdHref = (await resultButton("results/summary.md", 0)).getAttribute("href");
            (await resultButton("results/summary.md", 1)).click();
            const pre = await until("the summary", () => document.querySelector("nav .prose pre"));
            return { md_href: mdHref, text: pre.textContent };
        },
    };

    async function run(route) {
        if (!(route in routes)) throw new Error("unknown route #" + route);
        return await routes[route]();
    }

    const route = location.hash.slice(1);
    run(route).then(
        (data) => ({ ok: true, route, data }),
        (err) => ({ ok: false, route, error: String(err && err.stack || err) }),
    ).then(function (result) {
        const out = document.createElement("pre");
        out.id = "probe";
        out.hidden = true;
        out.textContent = JSON.stringify(result);
        document.body.appendChild(out);
    });
})();
