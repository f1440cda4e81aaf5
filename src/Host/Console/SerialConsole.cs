using System.Text;
using Akka.Actor;
using ActorVmm.Devices;

namespace ActorVmm.Host;

/// <summary>
/// Where the guest's serial console goes (host stdout or a file) and what it reads (stdin or
/// nothing). The UART's and the virtio console's actors write, under one lock (the flush timer's). Output
/// is buffered and flushed at each newline, at 4 KiB and every 50 ms. A bounded copy of
/// everything written is kept for tests and the demo.
/// </summary>
public sealed class SerialConsole : IDisposable
{
    public const int CaptureLimit = 1 << 20;

    private readonly Stream? _output;
    private readonly bool _ownsOutput;
    private Action<byte[]>? _sink;
    private readonly bool _capture;
    private readonly MemoryStream _buffer = new();
    private readonly MemoryStream _captured = new();
    private readonly object _gate = new();
    private readonly Timer _flushTimer;
    private Thread? _inputThread;
    private volatile bool _disposed;

    public long BytesWritten { get; private set; }

    private SerialConsole(Stream? output, bool ownsOutput, Action<byte[]>? sink = null, bool capture = true)
    {
        _output = output;
        _ownsOutput = ownsOutput;
        _sink = sink;
        _capture = capture;
        _flushTimer = new Timer(_ => Flush(), null, 50, 50);
    }

    /// <summary>Console to the host's standard output.</summary>
    public static SerialConsole ToStdout() => new(System.Console.OpenStandardOutput(), ownsOutput: false);

    /// <summary>Console to a file (created or truncated). Throws IOException with the reason.</summary>
    public static SerialConsole ToFile(string path) => new(new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.Read), ownsOutput: true);

    /// <summary>
    /// Console of a VM on a host node: each flushed chunk goes to <paramref name="sink"/> (the VM's
    /// console hub), and also to the file <paramref name="file"/> if given. Nothing is captured.
    /// Throws IOException with the reason when the file cannot be created.
    /// </summary>
    public static SerialConsole ToSink(Action<byte[]> sink, string? file) =>
        new(file is null ? null : new FileStream(file, FileMode.Create, FileAccess.Write, FileShare.Read), ownsOutput: file is not null, sink, capture: false);

    /// <summary>From now on, each flushed chunk also goes to <paramref name="sink"/> (`ctl console`'s hub).</summary>
    public void AddSink(Action<byte[]> sink)
    {
        lock (_gate) _sink += sink;
    }

    /// <summary>Console captured in memory only (tests).</summary>
    public static SerialConsole Captured() => new(null, ownsOutput: false);

    public void Write(byte value)
    {
        StartupTimes.Mark("first output");
        lock (_gate)
        {
            BytesWritten++;
            if (_capture && _captured.Length < CaptureLimit) _captured.WriteByte(value);
            if (_output is null && _sink is null) return;
            _buffer.WriteByte(value);
            if (value == (byte)'\n' || _buffer.Length >= 4096) FlushLocked();
        }
    }

    /// <summary>Bytes from another console device of the VM (the virtio console), in the same stream as
    /// the UART's: each write is whole under the lock, so two devices' bytes interleave only between writes.</summary>
    public void Write(ReadOnlySpan<byte> bytes)
    {
        lock (_gate)
            foreach (var b in bytes) Write(b);
    }

    /// <summary>Everything the guest wrote so far (up to <see cref="CaptureLimit"/> bytes), as bytes.</summary>
    public byte[] CapturedBytes()
    {
        lock (_gate) return _captured.ToArray();
    }

    /// <summary>Everything the guest wrote so far, decoded as Latin-1 (one char per byte).</summary>
    public string CapturedText() => Encoding.Latin1.GetString(CapturedBytes());

    public void Flush()
    {
        lock (_gate) FlushLocked();
    }

    private void FlushLocked()
    {
        if ((_output is null && _sink is null) || _buffer.Length == 0 || _disposed) return;
        try
        {
            _output?.Write(_buffer.GetBuffer(), 0, (int)_buffer.Length);
            _output?.Flush();
        }
        catch (IOException)
        {
            // The reader went away (a closed pipe): the guest's output is dropped, the VM goes on.
        }
        _sink?.Invoke(_buffer.ToArray());
        _buffer.SetLength(0);
    }

    /// <summary>Reads the host's stdin on a background thread and gives it to the console devices' actors
    /// (the UART, and the virtio console if the VM has one: whichever the guest reads takes it). Stops at
    /// end of input. Each chunk is a fresh array (messages are immutable).</summary>
    public void StartInputFromStdin(ActorSystem system, params ActorPath[] devices)
    {
        if (System.Console.IsInputRedirected && !File.Exists("/proc/self/fd/0")) return;
        var targets = devices.Select(d => system.ActorSelection(d)).ToArray();
        _inputThread = new Thread(() =>
        {
            try
            {
                using var stdin = System.Console.OpenStandardInput();
                var buffer = new byte[256];
                while (!_disposed)
                {
                    var n = stdin.Read(buffer, 0, buffer.Length);
                    if (n <= 0) return;
                    var input = new DeviceProtocol.HostInput(buffer.AsSpan(0, n).ToArray());
                    foreach (var target in targets) target.Tell(input);
                }
            }
            catch (IOException) { }
            catch (ObjectDisposedException) { }
        })
        { IsBackground = true, Name = "serial-input" };
        _inputThread.Start();
    }

    public void Dispose()
    {
        _flushTimer.Dispose();
        Flush();
        _disposed = true;
        if (_ownsOutput) _output?.Dispose();
    }
}
