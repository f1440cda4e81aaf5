using DotNetty.Common.Internal.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace ActorVmm.Host.Control;

/// <summary>The transport under Akka remoting (DotNetty), as a host and `ctl` use it.</summary>
internal static class RemotingTransport
{
    /// <summary>
    /// DotNetty logs through Microsoft.Extensions.Logging, by default to a LoggerFactory of its own
    /// with an EventSource provider that nothing here listens to; building that factory (and
    /// loading its assemblies) is among the slowest steps of remoting's start. None instead: Akka
    /// reports what fails in its transport through its own log. Call before remoting starts.
    /// </summary>
    public static void WithoutDotNettyLogging() => InternalLoggerFactory.DefaultFactory = NullLoggerFactory.Instance;
}
