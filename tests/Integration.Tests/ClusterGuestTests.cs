using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using ActorVmm.Host.Control;
using ActorVmm.Host.Guests;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Real guests on a cluster of two `actorvmm host` processes on 127.0.0.1: `ctl run` starts them on a
/// chosen node and on the one placement picks, `ctl list` shows both with their nodes from either node,
/// `ctl console` shows a guest's output and types into it from the node it does not run on. `ctl`'s
/// requests are made by its client in this process (a process per request costs a minute in the KVM box).
/// </summary>
public sealed class ClusterGuestTests : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-cluster-guests-").FullName;
    private readonly List<Process> _nodes = [];
    private readonly StringBuilder _log = new(); // both nodes' output and the test's steps, for a failure's message
    private readonly Stopwatch _clock = Stopwatch.StartNew();

    private void Step(string who, string? line)
    {
        lock (_log) _log.AppendLine($"{_clock.Elapsed.TotalSeconds,7:0.0} [{who}] {line}");
    }

    /// <summary>The end of what the nodes printed.</summary>
    private string NodeLog()
    {
        lock (_log) return _log.Length <= 16_000 ? _log.ToString() : _log.ToString(_log.Length - 16_000, 16_000);
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public Task DisposeAsync()
    {
        foreach (var p in _nodes)
        {
            try { if (!p.HasExited) p.Kill(entireProcessTree: true); }
            catch (InvalidOperationException) { }
            p.Dispose();
        }
        Directory.Delete(_dir, recursive: true);
        return Task.CompletedTask;
    }

    private static ProcessStartInfo Actorvmm(params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "actorvmm.dll"));
        foreach (var a in args) start.ArgumentList.Add(a);
        return start;
    }

    /// <summary>This test is not about failure detection: a generous heartbeat pause, so that a loaded or
    /// emulated machine (the KVM box runs 30-50 times slower) never takes a slow node for a dead one.</summary>
    private const string PatientNodes = """
        actorvmm.cluster.failure-detector.acceptable-heartbeat-pause = 60s
        actorvmm.cluster.split-brain-resolver.stable-after = 60s
        """;

    /// <summary>A killed node is removed after about 30 + 3 s: a pause long enough that the KVM box, where a
    /// node's start of a VM can hold up its heartbeats for many seconds, takes no live node for dead.</summary>
    private const string DetectingNodes = """
        actorvmm.cluster.failure-detector.acceptable-heartbeat-pause = 30s
        actorvmm.cluster.split-brain-resolver.stable-after = 3s
        """;

    private async Task<int> StartNode(int? seed, string nodeConfig = PatientNodes)
    {
        int port;
        using (var l = new TcpListener(IPAddress.Loopback, 0))
        {
            l.Start();
            port = ((IPEndPoint)l.LocalEndpoint).Port;
        }
        var config = Path.Combine(_dir, $"node-{port}.conf");
        await File.WriteAllTextAsync(config, nodeConfig);
        var args = new List<string> { "host", "--port", port.ToString(), "--directory", _dir, "--config", config };
        if (seed is { } s) args.AddRange(["--seed", $"127.0.0.1:{s}"]);
        var p = Process.Start(Actorvmm([.. args]))!;
        p.StandardInput.Close();
        _nodes.Add(p);
        var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        p.OutputDataReceived += (_, e) =>
        {
            Step($"{port}", e.Data);
            if (e.Data?.Contains("is up in a cluster") == true) up.TrySetResult();
        };
        p.ErrorDataReceived += (_, e) =>
        {
            Step($"{port} err", e.Data);
        };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        try { await up.Task.WaitAsync(TimeSpan.FromMinutes(5)); }
        catch (TimeoutException) { Assert.Fail($"node {port} did not come up:\n{NodeLog()}"); }
        return port;
    }

    /// <summary>Two nodes (the first starts the cluster), both Up as the first sees them, and a ctl client.</summary>
    private async Task<(ControlClient Client, string Node1, string Node2, int Port2)> TwoNodes(string nodeConfig)
    {
        var port1 = await StartNode(null, nodeConfig);
        var port2 = await StartNode(port1, nodeConfig);
        var node1 = $"127.0.0.1:{port1}";
        var client = ControlClient.Create(TimeSpan.FromMinutes(2), _dir);
        // The first association of this process with a node can take minutes in the KVM box, while both
        // nodes are still starting (JIT, TLS): ask again until the deadline.
        var joined = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        while (true)
        {
            try
            {
                if ((await client.NodesAsync(node1)).Nodes.Count(n => n is { Status: "Up", Reachable: true }) == 2) break;
            }
            catch (ControlException e) when (DateTime.UtcNow < joined)
            {
                Step("test", $"node 1 not answering yet: {e.Message}");
            }
            Assert.True(DateTime.UtcNow < joined, $"node 1 does not see both nodes Up; the nodes printed:\n{NodeLog()}");
            await Task.Delay(1000);
        }
        return (client, node1, $"127.0.0.1:{port2}", port2);
    }

    private string Flat(string name, Action<Assembler> body)
    {
        var a = new Assembler(16);
        body(a);
        var path = Path.Combine(_dir, name);
        File.WriteAllBytes(path, GuestCode.Assemble(a, 0x7C00));
        return path;
    }

    private static void Print(Assembler a, string text)
    {
        a.mov(dx, 0x3F8);
        foreach (var c in text)
        {
            a.mov(al, (byte)c);
            a.@out(dx, al);
        }
    }

    /// <summary>Debug-exit with <paramref name="status"/> (exit code 2 × status + 1), then a halt with interrupts off.</summary>
    private static void Exit(Assembler a, byte status)
    {
        a.mov(al, status);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
    }

    /// <summary>Prints "ready", then echoes what it reads on COM1 until a 'q', then prints "bye" and exits
    /// through debug-exit with status 7 (exit code 15).</summary>
    private string EchoGuest() => Flat("echo.bin", a =>
    {
        var poll = a.CreateLabel();
        var done = a.CreateLabel();
        Print(a, "ready\n");
        a.Label(ref poll);
        a.mov(dx, 0x3FD);          // line status register
        a.@in(al, dx);
        a.test(al, 1);             // data ready
        a.jz(poll);
        a.mov(dx, 0x3F8);
        a.@in(al, dx);
        a.cmp(al, (byte)'q');
        a.je(done);
        a.@out(dx, al);
        a.jmp(poll);
        a.Label(ref done);
        Print(a, "bye\n");
        Exit(a, 7);
    });

    /// <summary>Prints "printer says hi" and halts with interrupts off (the VM ends, exit code 0).</summary>
    private string PrinterGuest() => Flat("printer.bin", a =>
    {
        Print(a, "printer says hi\n");
        a.cli();
        a.hlt();
    });

    [KvmFact]
    public async Task Vms_run_on_chosen_and_placed_nodes_and_are_listed_and_watched_from_any_node()
    {
        KvmRequirement.Check();
        // What `ctl` does, in this process (a ctl process per step costs a minute in the KVM box); the
        // console session below is the real `actorvmm ctl` executable.
        var (client, node1, node2, _) = await TwoNodes(PatientNodes);
        await using var _ = client;

        Step("test", "both nodes are up");
        KeyValuePair<string, string>[] Flat(string path) => [new("actorvmm.vm.boot.flat", path)];
        Assert.Equal(node2, await client.RunVmAsync(node1, "echo", [.. Flat(EchoGuest()), new("actorvmm.vm.trace", Path.Combine(_dir, "echo.jsonl"))], node2));
        Step("test", "echo runs");
        // Its message trace, read through the other node while it polls its UART.
        var echoEntry = await client.FindEntryAsync("echo", [node1]);
        Assert.Equal(node2, echoEntry.Node);
        Assert.Contains(await client.RecentTraceAsync(echoEntry, 5, ""), l => l.Receiver.Contains("uart0"));
        // Placement: node 2 has a VM, node 1 none, so the next goes to node 1.
        Assert.Equal(node1, await client.RunVmAsync(node2, "printer", Flat(PrinterGuest()), null));
        // Names are the cluster's: the same name is refused whichever node is asked.
        var refused = await Assert.ThrowsAsync<ControlException>(() => client.RunVmAsync(node1, "echo", Flat(PrinterGuest()), null));
        Assert.Contains($"a VM named echo is already on {node2}", refused.Message);

        // The printer's output, read through the node it does not run on, once it has ended.
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        ControlProtocol.VmEntry printer;
        while ((printer = await client.FindEntryAsync("printer", [node2])).Ended.Length == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the printer did not end");
            await Task.Delay(1000);
        }
        Step("test", "printer ended");
        Assert.Equal(node1, printer.Node);
        Assert.Contains("exit code 0", printer.Ended);
        using var output = new MemoryStream();
        Assert.Contains("exit code 0", await client.ConsoleAsync(printer, follow: false, output, input: null, CancellationToken.None));
        Assert.Equal("printer says hi\n", Encoding.ASCII.GetString(output.ToArray()));

        // A live console session with the echo guest through node 1 (`ctl console --follow` is this
        // call with the terminal's streams): what is typed reaches the guest, what it echoes comes
        // back, and the session ends with the VM.
        using var session = new MemoryStream();
        Step("test", "console session with echo starts");
        var ended = await client.ConsoleAsync(await client.FindEntryAsync("echo", [node1]), follow: true, session,
            new StringReader("hello\nq\n"), new CancellationTokenSource(TimeSpan.FromMinutes(5)).Token);
        Assert.True("ready\nhello\nbye\n" == Encoding.ASCII.GetString(session.ToArray()) && ended?.Contains("exit code 15") == true,
            $"the console session showed \"{Encoding.ASCII.GetString(session.ToArray())}\" and ended with \"{ended}\"; the nodes printed:\n{NodeLog()}");
    }

    /// <summary>Lines "0000\n" to "<paramref name="lines"/> - 1" on COM1, each followed by a wait of
    /// <paramref name="waitMs"/> ms on the ACPI PM timer (port 0x608: 24 bits at 3.579545 MHz), then
    /// debug-exit with status 5 (exit code 11).
    /// <para>With <paramref name="dirty"/>, after each line it also rewrites one word in each 512 bytes of the
    /// <see cref="Region"/> (all of its 8 pages), keeping the sum of the region's words in EBP, and it stops
    /// early when it reads a 'q' on COM1; at the end it sums the region again and prints "sum ok" (status 5)
    /// or "sum bad" (status 6, exit code 13): memory or EBP not what the guest wrote.</para></summary>
    private string CountingPrinter(int lines = 2000, int waitMs = 1, bool dirty = false) => Flat($"counter-{lines}-{waitMs}-{dirty}.bin", a =>
    {
        var end = a.CreateLabel();
        var line = a.CreateLabel();
        var digit = a.CreateLabel();
        var print = a.CreateLabel();
        var wait = a.CreateLabel();
        a.xor(ax, ax);
        a.mov(ds, ax);
        a.mov(__byte_ptr[Buffer + 4], (byte)'\n');
        if (dirty) a.xor(ebp, ebp);    // the region's sum (RAM starts zeroed)
        a.xor(bx, bx);                 // the line number
        a.Label(ref line);
        a.mov(ax, bx);
        a.mov(si, 3);
        a.mov(cx, 10);
        a.Label(ref digit);            // its four digits, last first
        a.xor(dx, dx);
        a.div(cx);
        a.add(dl, (byte)'0');
        a.mov(__byte_ptr[si + Buffer], dl);
        a.dec(si);
        a.jns(digit);
        a.xor(si, si);
        a.mov(dx, 0x3F8);
        a.Label(ref print);
        a.mov(al, __byte_ptr[si + Buffer]);
        a.@out(dx, al);
        a.inc(si);
        a.cmp(si, 5);
        a.jne(print);
        if (dirty)
        {
            var rewrite = a.CreateLabel();
            a.mov(di, Region);
            a.Label(ref rewrite);          // word at DI: sum -= old; new = line ^ DI; sum += new
            a.movzx(eax, __word_ptr[di]);
            a.sub(ebp, eax);
            a.mov(ax, bx);
            a.xor(ax, di);
            a.mov(__word_ptr[di], ax);
            a.movzx(eax, ax);
            a.add(ebp, eax);
            a.add(di, 512);
            a.jnz(rewrite);                // up to the end of the 64 KiB segment
        }
        a.mov(dx, 0x608);
        a.@in(eax, dx);
        a.mov(edi, eax);
        a.Label(ref wait);
        a.@in(eax, dx);
        a.sub(eax, edi);
        a.and(eax, 0xFFFFFF);
        a.cmp(eax, 3580 * waitMs);
        a.jb(wait);
        a.inc(bx);
        if (dirty)
        {
            var go = a.CreateLabel();
            a.mov(dx, 0x3FD);              // line status: a byte received?
            a.@in(al, dx);
            a.test(al, 1);
            a.jz(go);
            a.mov(dx, 0x3F8);
            a.@in(al, dx);
            a.cmp(al, (byte)'q');
            a.je(end);
            a.Label(ref go);
        }
        a.cmp(bx, (short)lines);
        a.jne(line);
        a.Label(ref end);
        if (dirty)
        {
            var sum = a.CreateLabel();
            var bad = a.CreateLabel();
            a.xor(ecx, ecx);
            a.mov(di, Region);
            a.Label(ref sum);
            a.movzx(eax, __word_ptr[di]);
            a.add(ecx, eax);
            a.add(di, 2);
            a.jnz(sum);
            a.cmp(ecx, ebp);
            a.jne(bad);
            Print(a, "sum ok\n");
            Exit(a, 5);
            a.Label(ref bad);
            Print(a, "sum bad\n");
            Exit(a, 6);
            return;
        }
        Exit(a, 5);
    });

    /// <summary>The 32 KiB the dirtying counter rewrites: 0x8000 to the end of the first 64 KiB, above the image.</summary>
    private const ushort Region = 0x8000;

    /// <summary>Where the counting printer builds a line (conventional memory below the image).</summary>
    private const int Buffer = 0x500;

    private static string CountedLines(int lines = 2000) => string.Concat(Enumerable.Range(0, lines).Select(i => $"{i:0000}\n"));

    [KvmFact]
    public async Task A_running_guest_migrates_between_nodes_and_back_and_its_console_goes_on_with_no_gap_and_no_repeat()
    {
        KvmRequirement.Check();
        var (client, node1, node2, _) = await TwoNodes(PatientNodes);
        await using var _ = client;
        // At most 9999 lines (200 s at 20 ms a line); the test ends it with a 'q' typed after the last move.
        const int lines = 9999;
        // Two vcpus (the second waits for a SIPI that never comes: its state moves too); the guest rewrites
        // all of its 8-page region after every line and checks the region's sum at the end.
        Assert.Equal(node1, await client.RunVmAsync(node1, "mover",
            [new("actorvmm.vm.boot.flat", CountingPrinter(lines, waitMs: 20, dirty: true)), new("actorvmm.vm.cpus", "2")], node1));
        Step("test", "mover runs on node 1");

        // One console session, attached through node 1 before any move, for the guest's whole life.
        var console = new FollowedConsole(client, await client.FindEntryAsync("mover", [node1]), TimeSpan.FromMinutes(20));
        Task PrintsMore(long bytes) => console.PrintsMore(bytes, NodeLog);

        // Refused before anything happens: the VM goes on where it is.
        await PrintsMore(250);
        var refused = await Assert.ThrowsAsync<ControlException>(async () => await client.MigrateAsync(await client.FindEntryAsync("mover", [node2]), "127.0.0.1:1"));
        Assert.Contains("no node 127.0.0.1:1 is up", refused.Message);
        Assert.Equal(ActorVmm.Host.Vm.VmProtocol.Phase.Running, (await client.StatusAsync((await client.FindEntryAsync("mover", [node2])).Actor)).Phase);

        // There and back, twice, each time after more output; each is asked through the node it leaves.
        // The first two moves copy memory while the guest runs (pre-copy), the last two stop it first.
        var at = node1;
        for (var move = 0; move < 4; move++)
        {
            await PrintsMore(250);
            var to = at == node1 ? node2 : node1;
            var precopy = move < 2;
            var reports = new List<ActorVmm.Host.Cluster.MigrationProtocol.Progress>();
            string said;
            try { said = await client.MigrateAsync(await client.FindEntryAsync("mover", [at]), to, reports.Add, stopAndCopy: !precopy); }
            catch (ControlException e) { throw new Xunit.Sdk.XunitException($"move {move + 1}: {e.Message}; the nodes printed:\n{NodeLog()}"); }
            Step("test", said.TrimEnd());
            Assert.Contains($"migrated from {at} to {to} by {(precopy ? "pre-copy (" : "stop-and-copy:")}", said);
            // `ctl migrate` showed each step while it ran, the transfer with the guest stopped.
            Assert.Contains(reports, r => r is { Step: "the transfer", Paused: true });
            string[] stopped = ["the snapshot", "the console's state", "the target's answer to the offer", "the transfer", "the release of the VM here", "the start on the target"];
            if (precopy)
            {
                // Guest memory went while the guest ran: round 1 all of it, then the pages it wrote meanwhile.
                var running = reports.TakeWhile(r => r.Step != "the snapshot").ToList();
                Assert.All(running, r => Assert.False(r.Paused, $"the guest was stopped during \"{r.Step}\""));
                Assert.Equal(["tracking the guest's writes", "round 1: copying guest memory", "the target's answer to the offer", "round 1: sending guest memory"],
                    running.Select(r => r.Step).Distinct().Take(4));
                Assert.True(running[^1].PagesSent > 0, "no page was sent while the guest ran");
                Assert.Equal(stopped, reports.Skip(running.Count).Select(r => r.Step).Distinct());
            }
            else Assert.Equal(stopped, reports.Select(r => r.Step).Distinct());
            var entry = await client.FindEntryAsync("mover", [at]);
            Assert.True((to, "") == (entry.Node, entry.Ended), $"after move {move + 1} mover is on {entry.Node} ({entry.Ended}); the nodes printed:\n{NodeLog()}");
            // The moved VM keeps the report for `ctl stats` (its node is told just before ctl is).
            var stats = "";
            for (var tries = 0; tries < 50 && !stats.Contains($"last migration: mover migrated from {at} to {to}"); tries++)
            {
                if (tries > 0) await Task.Delay(200);
                stats = await client.StatsAsync(entry.Actor);
            }
            Assert.True(stats.Contains($"last migration: mover migrated from {at} to {to}"), $"ctl stats said:\n{stats}");
            at = to;
        }

        // Typed into the session attached before the first move: it reaches the guest where it runs now.
        await PrintsMore(250);
        var (text, ended) = await console.Quit();
        var printedLines = text.Count(c => c == '\n') - 1;
        Assert.True(printedLines >= 250, $"the guest printed {text.Length} bytes; the nodes printed:\n{NodeLog()}");
        var expected = CountedLines(printedLines) + "sum ok\n"; // memory came through every move as the guest wrote it
        var same = 0;
        while (same < Math.Min(text.Length, expected.Length) && text[same] == expected[same]) same++;
        Assert.True(text == expected && ended?.Contains("exit code 11") == true,
            $"the console showed {text.Length} bytes, the first {same} as expected, and ended with \"{ended}\"; the nodes printed:\n{NodeLog()}");
        Assert.Equal(node1, (await client.FindEntryAsync("mover", [node2])).Node);
    }

    /// <summary>A `ctl console --follow` session of a test: what it showed so far, and a 'q' typed to end the guest.</summary>
    private sealed class FollowedConsole
    {
        private readonly MemoryStream _session = new();
        private readonly TypedLater _typed = new();
        private readonly Task<string?> _following;
        private long _printed;

        public FollowedConsole(ControlClient client, ControlProtocol.VmEntry vm, TimeSpan limit) =>
            _following = client.ConsoleAsync(vm, follow: true, new CallbackStream(bytes =>
            {
                lock (_session) _session.Write(bytes);
                Interlocked.Add(ref _printed, bytes.Length);
            }), input: _typed, new CancellationTokenSource(limit).Token);

        /// <summary>Waits until the guest printed <paramref name="bytes"/> more (5 minutes at most).</summary>
        public async Task PrintsMore(long bytes, Func<string> log)
        {
            var until = Interlocked.Read(ref _printed) + bytes;
            var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
            while (Interlocked.Read(ref _printed) < until)
            {
                Assert.True(DateTime.UtcNow < deadline && !_following.IsCompleted,
                    $"the guest printed {Interlocked.Read(ref _printed)} bytes and no more; the nodes printed:\n{log()}");
                await Task.Delay(20);
            }
        }

        /// <summary>Types 'q' and waits for the session's end: what it showed, and how the VM ended.</summary>
        public async Task<(string Text, string? Ended)> Quit()
        {
            _typed.Type("q");
            var ended = await _following;
            lock (_session) return (Encoding.ASCII.GetString(_session.ToArray()), ended);
        }
    }

    /// <summary>Console input that has nothing to give until <see cref="Type"/>, then that one line, then ends.</summary>
    private sealed class TypedLater : TextReader
    {
        private readonly TaskCompletionSource<string?> _line = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private bool _given;

        public void Type(string line) => _line.TrySetResult(line);

        public override async ValueTask<string?> ReadLineAsync(CancellationToken cancel)
        {
            if (_given) return null;
            _given = true;
            return await _line.Task.WaitAsync(cancel);
        }
    }

    /// <summary>A write-only stream that hands each write to <paramref name="written"/>.</summary>
    private sealed class CallbackStream(Action<byte[]> written) : Stream
    {
        public override void Write(byte[] buffer, int offset, int count) => written(buffer.AsSpan(offset, count).ToArray());
        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancel)
        {
            Write(buffer, offset, count);
            return Task.CompletedTask;
        }
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancel = default)
        {
            written(buffer.ToArray());
            return ValueTask.CompletedTask;
        }
        public override void Flush() { }
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }

    [KvmFact]
    public async Task A_uart_on_another_node_prints_for_the_guest_and_the_guest_finishes_when_that_node_is_killed()
    {
        KvmRequirement.Check();
        // Node 1 is the oldest: with keep-oldest it survives the other's death.
        var (client, node1, node2, port2) = await TwoNodes(DetectingNodes);
        await using var _ = client;
        Assert.Equal(node1, await client.RunVmAsync(node1, "counter",
            [new("actorvmm.vm.boot.flat", CountingPrinter()), new("actorvmm.vm.devices.uart0.node", node2)], node1));
        Step("test", "counter runs on node 1, its uart0 on node 2");

        async Task<string> Printed(ControlProtocol.VmEntry entry)
        {
            using var output = new MemoryStream();
            await client.ConsoleAsync(entry, follow: false, output, input: null, CancellationToken.None);
            return Encoding.ASCII.GetString(output.ToArray());
        }
        var counter = await client.FindEntryAsync("counter", [node1]);
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        while ((await Printed(counter)).Length < 1000)
        {
            Assert.True(DateTime.UtcNow < deadline, $"the counter printed too little; the nodes printed:\n{NodeLog()}");
            await Task.Delay(50);
        }
        var stats = await client.StatsAsync(counter.Actor);
        Step("test", stats);
        Assert.True(stats.Contains($"device uart0:") && stats.Contains($"(on {node2})"), $"ctl stats said:\n{stats}\nthe nodes printed:\n{NodeLog()}");
        _nodes[1].Kill(entireProcessTree: true);
        Step("test", "node 2 killed");

        deadline = DateTime.UtcNow + TimeSpan.FromMinutes(10);
        while ((counter = await client.FindEntryAsync("counter", [node1])).Ended.Length == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, $"the counter did not end; the nodes printed:\n{NodeLog()}");
            await Task.Delay(500);
        }
        Assert.True(counter.Ended.Contains("exit code 11"), $"{counter.Ended}; the nodes printed:\n{NodeLog()}");
        // What the guest printed is every line but the bytes that were in flight to node 2 when it died:
        // one gap, as long as the writes node 1 counted as lost.
        var printed = await Printed(counter);
        var expected = CountedLines();
        var kept = 0;
        while (kept < printed.Length && printed[kept] == expected[kept]) kept++;
        var gap = expected.Length - printed.Length;
        Assert.True(gap >= 0 && expected.EndsWith(printed[kept..], StringComparison.Ordinal),
            $"the output is not the lines with one gap: {printed.Length} bytes, the first {kept} as expected; the nodes printed:\n{NodeLog()}");
        var lost = System.Text.RegularExpressions.Regex.Match(NodeLog(), @"uart0: its node 127\.0\.0\.1:" + port2 + @" was lost; (\d+) write\(s\) in flight were lost");
        Assert.True(lost.Success, $"node 1 did not report uart0's move; the nodes printed:\n{NodeLog()}");
        Assert.Equal(int.Parse(lost.Groups[1].Value), gap);
        Assert.InRange(gap, 0, ActorVmm.Host.Cluster.RemoteDeviceProxy.RemoteWriteWindow);
    }

    [KvmFact]
    public async Task A_checkpointed_guest_whose_node_is_killed_starts_again_on_another_node_from_its_last_checkpoint()
    {
        KvmRequirement.Check();
        var (client, node1, node2, _) = await TwoNodes(DetectingNodes);
        await using var _ = client;
        // A third node, which sees the failover too. Not in CI's KVM box: there three host processes on
        // its two emulated cpus starve each other (seen: heartbeats sent 34 s late, live nodes marked
        // unreachable, a third node's first answers over a minute late), and the two nodes left show the same.
        var nodes = KvmBox.Inside ? 2 : 3;
        if (nodes == 3) await StartNode(int.Parse(node1.Split(':')[1]), DetectingNodes);
        var joined = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        while ((await client.NodesAsync(node1)).Nodes.Count(n => n is { Status: "Up", Reachable: true }) < nodes)
        {
            Assert.True(DateTime.UtcNow < joined, $"node 1 does not see {nodes} nodes Up; the nodes printed:\n{NodeLog()}");
            await Task.Delay(1000);
        }
        // The dirtying counter on node 2, checkpointed every 2 s into a directory all three see. When
        // node 2 dies, node 1 is the oldest node left.
        var checkpoints = Path.Combine(_dir, "checkpoints");
        // The placement asks every node for its load, each within 30 s; on a slow machine a node's first
        // answers can come later than that: asked again until the deadline.
        string placed;
        var placing = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        while (true)
        {
            try
            {
                placed = await client.RunVmAsync(node1, "phoenix",
                [
                    new("actorvmm.vm.boot.flat", CountingPrinter(9999, waitMs: 10, dirty: true)),
                    new("actorvmm.vm.checkpoint.interval", "2s"), new("actorvmm.vm.checkpoint.directory", checkpoints),
                ], node2);
                break;
            }
            catch (ControlException e) when (e.Message.Contains($"no node {node2} in the cluster"))
            {
                Assert.True(DateTime.UtcNow < placing, $"{e.Message}; the nodes printed:\n{NodeLog()}");
                Step("test", e.Message);
                await Task.Delay(1000);
            }
        }
        Assert.Equal(node2, placed);
        Step("test", "phoenix runs on node 2");

        // What it prints on node 2, as it prints it, until the kill.
        var seen = 0L;
        var watching = client.ConsoleAsync(await client.FindEntryAsync("phoenix", [node2]), follow: true,
            new CallbackStream(bytes => Interlocked.Add(ref seen, bytes.Length)), input: null, new CancellationTokenSource(TimeSpan.FromMinutes(10)).Token);
        // Two complete checkpoints (the second written from the first and the pages written since), then the kill.
        var vmCheckpoints = Path.Combine(checkpoints, "phoenix");
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        while (ActorVmm.Host.Cluster.CheckpointProtocol.Complete(vmCheckpoints).Count < 2)
        {
            Assert.True(DateTime.UtcNow < deadline, $"phoenix has not been checkpointed twice; the nodes printed:\n{NodeLog()}");
            await Task.Delay(200);
        }
        _nodes[1].Kill(entireProcessTree: true);
        var killed = DateTime.UtcNow;
        var before = Interlocked.Read(ref seen);
        Step("test", $"node 2 killed after phoenix printed {before} bytes");

        // The oldest node left starts it again from the last complete checkpoint.
        ControlProtocol.VmEntry again;
        deadline = DateTime.UtcNow + TimeSpan.FromMinutes(10);
        while (true)
        {
            var list = await client.ListAsync(node1);
            var found = list.Vms.FirstOrDefault(v => v.Name == "phoenix" && v.Node != node2 && v.Ended.Length == 0);
            if (found is not null)
            {
                again = found;
                break;
            }
            Assert.True(DateTime.UtcNow < deadline, $"phoenix was not started again; the nodes printed:\n{NodeLog()}");
            await Task.Delay(200);
        }
        Step("test", $"phoenix runs again on {again.Node} {(DateTime.UtcNow - killed).TotalSeconds:0.0} s after the kill: {again.Origin}");
        Assert.Equal(node1, again.Node);
        Assert.Matches(@"^started again from checkpoint-\d{6} after " + System.Text.RegularExpressions.Regex.Escape(node2) + " was removed$", again.Origin);

        // Its count goes on from the checkpoint: the lines it prints now are the counter's from a point
        // before the kill, not from 0; its memory is what it wrote (the sum checks out at the end).
        var console = new FollowedConsole(client, again, TimeSpan.FromMinutes(10));
        await console.PrintsMore(250, NodeLog);
        var (text, ended) = await console.Quit();
        Assert.True(text.EndsWith("sum ok\n", StringComparison.Ordinal) && ended?.Contains("exit code 11") == true,
            $"phoenix printed \"{text[..Math.Min(text.Length, 200)]}...\" and ended with \"{ended}\"; the nodes printed:\n{NodeLog()}");
        var lines = text[..^"sum ok\n".Length];
        var from = CountedLines(9999).IndexOf(lines, StringComparison.Ordinal);
        // At most the line in flight to the console when node 2 died was written before the checkpoint and not seen.
        Assert.True(from > 0 && from <= before + 5,
            $"after its start again phoenix printed from byte {from} of the count (it had printed {before} before the kill): \"{lines[..Math.Min(lines.Length, 40)]}...\"");
    }
}
