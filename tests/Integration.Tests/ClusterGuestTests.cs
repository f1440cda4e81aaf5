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

    private async Task<int> StartNode(int? seed)
    {
        int port;
        using (var l = new TcpListener(IPAddress.Loopback, 0))
        {
            l.Start();
            port = ((IPEndPoint)l.LocalEndpoint).Port;
        }
        // This test is not about failure detection: a generous heartbeat pause, so that a loaded or
        // emulated machine (the KVM box runs 30-50 times slower) never takes a slow node for a dead one.
        var config = Path.Combine(_dir, "node.conf");
        await File.WriteAllTextAsync(config, """
            actorvmm.cluster.failure-detector.acceptable-heartbeat-pause = 60s
            actorvmm.cluster.split-brain-resolver.stable-after = 60s
            """);
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
        a.mov(al, 7);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
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
        var port1 = await StartNode(null);
        var port2 = await StartNode(port1);
        var node1 = $"127.0.0.1:{port1}";
        var node2 = $"127.0.0.1:{port2}";
        // What `ctl` does, in this process (a ctl process per step costs a minute in the KVM box); the
        // console session below is the real `actorvmm ctl` executable.
        await using var client = ControlClient.Create(TimeSpan.FromMinutes(2), _dir);
        var joined = DateTime.UtcNow + TimeSpan.FromMinutes(3);
        while ((await client.NodesAsync(node1)).Nodes.Count(n => n is { Status: "Up", Reachable: true }) < 2)
        {
            Assert.True(DateTime.UtcNow < joined, "node 1 does not see both nodes Up");
            await Task.Delay(1000);
        }

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
}
