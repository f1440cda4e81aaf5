using System.Diagnostics;
using Akka.Actor;
using Akka.Configuration;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using Serilog;
using Serilog.Core;
using Serilog.Events;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// Who may talk to a host: only a peer holding the cluster certificate (mutual TLS, pinned), and
/// only with the project's message types. Real actor systems over loopback TLS; real files.
/// </summary>
[Collection(SerilogCollection.Name)]
public sealed class ClusterSecurityTests : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-security-").FullName;
    private ActorSystem _host = null!;
    private string _address = "";

    private Akka.Configuration.Config HostConfig(string directory) =>
        ConfigValues.From([new("actorvmm.control.directory", directory)]).WithFallback(VmConfig.Load(null));

    public Task InitializeAsync()
    {
        _host = HostRunner.CreateSystem(HostConfig(Path.Combine(_dir, "host")), ControlClient.HostSystemName, control: true);
        _address = HostRunner.ControlAddress(_host);
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _host.Terminate();
        Directory.Delete(_dir, recursive: true);
    }

    [Fact]
    public void The_certificate_is_created_owner_only_in_an_owner_only_directory()
    {
        var directory = Path.Combine(_dir, "host");
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute, File.GetUnixFileMode(directory));
        var certificate = ClusterCertificate.DefaultPath(directory);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(certificate));
        using var loaded = ClusterCertificate.Load(certificate);
        Assert.True(loaded.HasPrivateKey);
    }

    [Fact]
    public async Task A_client_with_the_hosts_certificate_is_answered()
    {
        await using var client = ControlClient.Create(TimeSpan.FromSeconds(10), Path.Combine(_dir, "host"));
        var list = await client.ListAsync(_address);
        Assert.Equal(_address, list.Host);
    }

    [Fact]
    public async Task A_client_with_another_certificate_is_refused()
    {
        // What any other user can make: a certificate of their own, with the same subject.
        var other = Path.Combine(_dir, "other");
        HostDirectory.EnsurePrivate(other);
        ClusterCertificate.Create(ClusterCertificate.DefaultPath(other));
        await using var client = ControlClient.Create(TimeSpan.FromSeconds(6), other);
        var e = await Assert.ThrowsAsync<ControlException>(() => client.ListAsync(_address));
        Assert.Contains("does not answer", e.Message);
    }

    [Fact]
    public void A_certificate_others_may_read_is_refused()
    {
        var path = Path.Combine(_dir, "host", "open.pfx");
        ClusterCertificate.Create(path);
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        var e = Assert.Throws<ClusterSecurityException>(() => ClusterCertificate.Load(path));
        Assert.Contains("chmod 600", e.Message);
        Assert.Contains("644", e.Message);
    }

    [Fact]
    public void A_host_directory_of_another_user_is_refused_and_a_wide_one_of_ours_is_narrowed()
    {
        var ours = Path.Combine(_dir, "wide");
        Directory.CreateDirectory(ours);
        File.SetUnixFileMode(ours, (UnixFileMode)0b111_101_101);
        HostDirectory.EnsurePrivate(ours);
        Assert.Equal((UnixFileMode)0b111_000_000, File.GetUnixFileMode(ours));

        if (Environment.UserName != "root") return; // only root can give a directory to another user
        var theirs = Path.Combine(_dir, "theirs");
        Directory.CreateDirectory(theirs);
        Assert.Equal(0, Chown(theirs, 65534, 65534));
        var e = Assert.Throws<ClusterSecurityException>(() => HostDirectory.EnsurePrivate(theirs));
        Assert.Contains("belongs to user 65534", e.Message);
    }

    [Fact]
    public async Task Ctl_as_another_local_user_cannot_control_the_host()
    {
        if (Environment.UserName != "root" || !File.Exists("/usr/bin/setpriv")) return; // needs a second user to run as
        // The executables must be readable by that user: copy what ctl needs to a world-readable place.
        var bin = Path.Combine(_dir, "bin");
        Directory.CreateDirectory(bin);
        foreach (var f in Directory.EnumerateFiles(AppContext.BaseDirectory)) File.Copy(f, Path.Combine(bin, Path.GetFileName(f)));
        File.SetUnixFileMode(_dir, (UnixFileMode)0b111_101_101);
        var start = new ProcessStartInfo("/usr/bin/setpriv")
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        foreach (var a in new[] { "--reuid", "65534", "--regid", "65534", "--clear-groups",
                     Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "/usr/bin/dotnet", Path.Combine(bin, "actorvmm.dll"),
                     "ctl", "list", "--host", _address, "--directory", Path.Combine(_dir, "host"), "--wait", "5" })
            start.ArgumentList.Add(a);
        start.Environment["HOME"] = bin;
        start.Environment["DOTNET_CLI_HOME"] = bin;
        using var p = Process.Start(start)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        Assert.True(p.WaitForExit(60_000), "ctl did not end");
        Assert.Equal(2, p.ExitCode);
        Assert.Contains("cluster certificate", await stderr);
        Assert.DoesNotContain(_address, await stdout);
    }

    [Fact]
    public async Task A_message_of_a_foreign_type_is_refused_and_logged_and_the_connection_goes_on()
    {
        var seen = new TaskCompletionSource<object>(TaskCreationOptions.RunContinuationsAsynchronously);
        var received = new List<object>();
        _host.ActorOf(Props.Create(() => new Recorder(received, seen)), "recorder");
        var log = new ListSink();
        var previous = Log.Logger;
        Log.Logger = new LoggerConfiguration().WriteTo.Sink(log).CreateLogger();
        try
        {
            // A peer with the certificate but a serializer that writes any type: what a compromised or
            // foreign program would send.
            var certificate = ClusterCertificate.Load(ClusterCertificate.DefaultPath(Path.Combine(_dir, "host")));
            var config = ConfigurationFactory.ParseString($$"""
                akka.actor.provider = remote
                akka.remote.dot-netty.tcp { hostname = "127.0.0.1", port = 0 }
                akka.actor.serializers.hyperion = "Akka.Serialization.HyperionSerializer, Akka.Serialization.Hyperion"
                akka.actor.serialization-bindings { "System.Object" = hyperion }
                akka.loglevel = ERROR
                {{ClusterCertificate.RemotingConfig}}
                """);
            using var peer = ActorSystem.Create("peer", BootstrapSetup.Create().WithConfig(config).And(ClusterCertificate.Remoting(certificate)));
            var target = peer.ActorSelection($"{ControlClient.HostAddress(_address)}/user/recorder");
            target.Tell(new Foreign(new FileInfo("/etc/passwd")));
            target.Tell(new ControlProtocol.VmList("after", 1, []));
            var got = await seen.Task.WaitAsync(TimeSpan.FromSeconds(30));
            Assert.Equal("after", Assert.IsType<ControlProtocol.VmList>(got).Host);
            lock (received) Assert.Single(received);
            Assert.Contains(log.Messages(), m => m.Contains("refused a message from the network") && m.Contains(typeof(Foreign).FullName!));
            await peer.Terminate();
        }
        finally { Log.Logger = previous; }
    }

    [Fact]
    public void The_type_filter_allows_the_projects_types_and_plain_data_only()
    {
        Assert.True(MessageTypeFilter.Allowed(typeof(ControlProtocol.VmList).AssemblyQualifiedName!));
        Assert.True(MessageTypeFilter.Allowed(typeof(List<ControlProtocol.VmEntry>).AssemblyQualifiedName!));
        Assert.True(MessageTypeFilter.Allowed(typeof(Dictionary<string, long[]>).AssemblyQualifiedName!));
        Assert.True(MessageTypeFilter.Allowed("System.TimeSpan, System.Private.CoreLib,%core%"));
        Assert.False(MessageTypeFilter.Allowed(typeof(FileInfo).AssemblyQualifiedName!));
        Assert.False(MessageTypeFilter.Allowed(typeof(Process).AssemblyQualifiedName!));
        Assert.False(MessageTypeFilter.Allowed(typeof(Foreign).AssemblyQualifiedName!));
        Assert.False(MessageTypeFilter.Allowed(typeof(List<FileInfo>).AssemblyQualifiedName!));
        Assert.False(MessageTypeFilter.Allowed(typeof(Func<int>).AssemblyQualifiedName!));
        Assert.False(MessageTypeFilter.Allowed("No.Such.Type, NoSuchAssembly"));
    }

    /// <summary>A type of another program (this test assembly is not one of the product's).</summary>
    public sealed record Foreign(FileInfo File);

    private sealed class Recorder : ReceiveActor
    {
        public Recorder(List<object> received, TaskCompletionSource<object> seen)
        {
            ReceiveAny(m =>
            {
                lock (received) received.Add(m);
                seen.TrySetResult(m);
            });
        }
    }

    private sealed class ListSink : ILogEventSink
    {
        private readonly List<string> _messages = [];

        public void Emit(LogEvent logEvent)
        {
            lock (_messages) _messages.Add(logEvent.RenderMessage());
        }

        public List<string> Messages()
        {
            lock (_messages) return [.. _messages];
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int chown(string path, uint owner, uint group);

    private static int Chown(string path, uint owner, uint group) => chown(path, owner, group);
}

/// <summary>Tests that replace Serilog's global logger run one at a time.</summary>
[CollectionDefinition(Name)]
public sealed class SerilogCollection
{
    public const string Name = "serilog global logger";
}
