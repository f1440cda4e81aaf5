using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using ActorVmm.Host.Guests;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Real guests on a cluster of two `actorvmm host` processes on 127.0.0.1: `ctl run` starts them on a
/// chosen node and on the one placement picks, `ctl list` shows both with their nodes from either node,
/// `ctl console` shows a guest's output and types into it from the node it does not run on.
/// </summary>
public sealed class ClusterGuestTests : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-cluster-guests-").FullName;
    private readonly List<Process> _nodes = [];

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
        var args = new List<string> { "host", "--port", port.ToString(), "--directory", _dir };
        if (seed is { } s) args.AddRange(["--seed", $"127.0.0.1:{s}"]);
        var p = Process.Start(Actorvmm([.. args]))!;
        p.StandardInput.Close();
        _nodes.Add(p);
        var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var err = new StringBuilder();
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data?.Contains("is up in a cluster") == true) up.TrySetResult();
        };
        p.ErrorDataReceived += (_, e) =>
        {
            lock (err) err.AppendLine(e.Data);
        };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        try { await up.Task.WaitAsync(TimeSpan.FromMinutes(5)); }
        catch (TimeoutException) { Assert.Fail($"node {port} did not come up: {err}"); }
        return port;
    }

    private async Task<(int Code, string Out, string Err)> Ctl(string? stdin, params string[] args)
    {
        var p = Process.Start(Actorvmm(["ctl", .. args, "--directory", _dir, "--wait", "120"]))!;
        if (stdin is not null) await p.StandardInput.WriteAsync(stdin);
        p.StandardInput.Close();
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(8));
        try { await p.WaitForExitAsync(cts.Token); }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"ctl {string.Join(' ', args)} did not end: {await stderr}");
        }
        return (p.ExitCode, await stdout, await stderr);
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
        var joined = DateTime.UtcNow + TimeSpan.FromMinutes(3);
        while (true)
        {
            var (rc, nodes, err) = await Ctl(null, "nodes", "--host", node1);
            Assert.True(rc == 0, err);
            if (nodes.Split('\n').Count(l => l.Contains(" Up ") && l.Contains(" reachable")) == 2) break;
            Assert.True(DateTime.UtcNow < joined, $"node 1 does not see both nodes Up: {nodes}");
            await Task.Delay(1000);
        }

        var (code, stdout, stderr) = await Ctl(null, "run", "--vm", "echo", "--node", node2, "--flat", EchoGuest(), "--host", node1,
            "--trace", Path.Combine(_dir, "echo-trace.jsonl"));
        Assert.True(code == 0, stderr);
        Assert.Contains($"echo runs on {node2}", stdout);
        // Its message trace, read through the other node while it polls its UART.
        (code, stdout, stderr) = await Ctl(null, "trace", "--vm", "echo", "-n", "5", "--host", node1);
        Assert.True(code == 0, stderr);
        Assert.Contains("uart0", stdout);
        // Placement: node 2 has a VM, node 1 none, so the next goes to node 1.
        (code, stdout, stderr) = await Ctl(null, "run", "--vm", "printer", "--flat", PrinterGuest(), "--host", node2);
        Assert.True(code == 0, stderr);
        Assert.Contains($"printer runs on {node1}", stdout);
        // Names are the cluster's: the same name is refused whichever node is asked.
        (code, _, stderr) = await Ctl(null, "run", "--vm", "echo", "--flat", PrinterGuest(), "--host", node1);
        Assert.Equal(2, code);
        Assert.Contains($"a VM named echo is already on {node2}", stderr);

        // The printer's output, read through the node it does not run on, once it has ended.
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        string list;
        while (true)
        {
            (code, list, stderr) = await Ctl(null, "list", "--host", node2);
            Assert.True(code == 0, stderr);
            if (list.Contains("printer") && list.Split('\n').First(l => l.StartsWith("printer")).Contains("Ended")) break;
            Assert.True(DateTime.UtcNow < deadline, $"the printer did not end: {list}");
            await Task.Delay(1000);
        }
        Assert.Contains($"node={node1}", list.Split('\n').First(l => l.StartsWith("printer")));
        Assert.Contains("exit code 0", list);
        Assert.Contains($"node={node2}", list.Split('\n').First(l => l.StartsWith("echo ")));
        (code, stdout, stderr) = await Ctl(null, "console", "--vm", "printer", "--host", node2);
        Assert.True(code == 0, stderr);
        Assert.Equal("printer says hi\n", stdout);

        // A live console session with the echo guest through node 1: what is typed reaches the guest,
        // what it echoes comes back, and the session ends with the VM.
        (code, stdout, stderr) = await Ctl("hello\nq\n", "console", "--vm", "echo", "--follow", "--host", node1);
        Assert.True(code == 0, stderr);
        Assert.Equal("ready\nhello\nbye\n", stdout);
        Assert.Contains("exit code 15", stderr);
    }
}
